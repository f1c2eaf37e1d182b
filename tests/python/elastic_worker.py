"""One phase of tests/python/test_elastic.py's real multi-process run, started by torchrun (or
as one plain process): a RankfeedTrainer on a tiny random-weight BERT cross-encoder (CPU, gloo),
recording the rows each rank trains at each step to `<out>/rows-<phase>-<rank>.jsonl`.

    elastic_worker.py DATASET OUTPUT_DIR PHASE JSON_OPTIONS

JSON_OPTIONS: {"data": RankfeedIterable keywords, "max_steps": int or -1, "save_steps": int,
"resume": a checkpoint path or null}."""

import json
import os
import sys

import torch
import transformers

from rankfeed.hf import RankfeedTrainer
from rankfeed.torch import RankfeedIterable


def _cpu_load():
    """On CPU DDP, transformers' Trainer loads the optimizer with map_location=args.device,
    torch.device("cpu", 0), which this torch cannot map ("don't know how to restore data location
    ... cpu:0"): a Trainer/torch matter, not rankfeed's. Map it to "cpu"."""
    load = torch.load

    def cpu_load(*args, map_location=None, **kwargs):
        if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type == "cpu":
            map_location = "cpu"
        return load(*args, map_location=map_location, **kwargs)

    torch.load = cpu_load


def main():
    _cpu_load()
    dataset, out, phase, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    torch.set_num_threads(1)
    args = transformers.TrainingArguments(
        output_dir=out, num_train_epochs=1, max_steps=opts["max_steps"], learning_rate=1e-3,
        report_to=[], save_strategy="steps", save_steps=opts["save_steps"],
        logging_strategy="no", use_cpu=True, seed=1,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_num_workers=opts.get("workers", 0), disable_tqdm=True)
    rank = args.process_index
    log = open(os.path.join(out, f"rows-{phase}-{rank}.jsonl"), "w")

    class Recording(RankfeedTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            log.write(json.dumps({"step": self.state.global_step, "rank": rank,
                                  "world": self.args.world_size,
                                  "epoch": self._rankfeed_loader._epoch,
                                  "rows": inputs["rows"].tolist()}) + "\n")
            log.flush()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=1,
                                     max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    data = RankfeedIterable(dataset, with_meta=True, **opts["data"])
    trainer = Recording(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=opts["resume"])
    log.close()
    summary = {"phase": phase, "rank": rank, "world": args.world_size,
               "global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps,
               "len": len(trainer._rankfeed_loader) if trainer._rankfeed_loader else None}
    with open(os.path.join(out, f"summary-{phase}-{rank}.json"), "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main()
