//! Loading a `tokenizer.json` for conversion, and reading the facts pair building needs.
//!
//! Ids are produced with `add_special_tokens = false`; truncation and padding configured in the
//! file are disabled (the MiniLM tokenizer.json ships with both set to 128).
//!
//! Special tokens are read from the files, never hard-coded per model:
//! - the single/pair templates from the `post_processor` (TemplateProcessing, BertProcessing,
//!   RobertaProcessing, possibly inside a Sequence);
//! - `unk` from the model, `pad` from the padding section;
//! - `bos`/`eos`/`pad`/`unk` and `padding_side` from `tokenizer_config.json` or
//!   `special_tokens_map.json` beside the tokenizer.json when present (that is where
//!   transformers reads them; an explicit `null` there means "none");
//! - otherwise from the added special tokens with the conventional names (`<s>`/`<bos>`,
//!   `</s>`/`<eos>`, `<pad>`/`[PAD]`, `<unk>`/`[UNK]`), as transformers' tokenizer classes do.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::format::{TemplatePiece, TokenizerFacts};

/// A tokenizer ready to produce stored ids.
pub struct TextTokenizer {
    tok: Tokenizer,
    path: PathBuf,
    facts: TokenizerFacts,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("facts", &self.facts)
            .finish()
    }
}

impl TextTokenizer {
    /// Load `path` (a tokenizer.json).
    ///
    /// A directory (a Hugging Face model directory) stands for its `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            let inside = path.join("tokenizer.json");
            if !inside.is_file() {
                return Err(Error::Tokenizer {
                    path,
                    message: "is a directory without a tokenizer.json: pass the path of a \
                              tokenizer.json file (Hugging Face model directories hold one; \
                              `tokenizer.save_pretrained(dir)` writes one for a fast tokenizer)"
                        .into(),
                });
            }
            path = inside;
        }
        let err = |message: String| Error::Tokenizer {
            path: path.clone(),
            message,
        };
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let json: Value =
            serde_json::from_slice(&bytes).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let mut tok = Tokenizer::from_bytes(&bytes).map_err(|e| err(e.to_string()))?;
        tok.with_truncation(None).map_err(|e| err(e.to_string()))?;
        tok.with_padding(None);
        let dir = path.parent().unwrap_or(Path::new("."));
        let facts = read_facts(&json, &tok, &bytes, dir).map_err(err)?;
        Ok(TextTokenizer { tok, path, facts })
    }

    /// The facts recorded in the manifest.
    pub fn facts(&self) -> &TokenizerFacts {
        &self.facts
    }

    /// The tokenizer.json path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids of many texts, no special tokens, in parallel on rayon's pool.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<i32>>> {
        let encodings = self
            .tok
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| self.error(e.to_string()))?;
        encodings
            .iter()
            .map(|e| to_i32(e.get_ids()).ok_or_else(|| self.error("token id >= 2^31".into())))
            .collect()
    }

    /// Ids of one text, no special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<i32>> {
        let e = self
            .tok
            .encode_fast(text, false)
            .map_err(|e| self.error(e.to_string()))?;
        to_i32(e.get_ids()).ok_or_else(|| self.error("token id >= 2^31".into()))
    }

    /// Text of ids (special tokens kept, so users see exactly what the model sees).
    pub fn decode(&self, ids: &[i32]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tok
            .decode(&ids, false)
            .map_err(|e| self.error(e.to_string()))
    }

    /// The token string of one id.
    pub fn id_to_token(&self, id: i32) -> Option<String> {
        u32::try_from(id).ok().and_then(|i| self.tok.id_to_token(i))
    }

    /// The underlying `tokenizers` tokenizer (truncation and padding disabled).
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }

    fn error(&self, message: String) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message,
        }
    }
}

fn to_i32(ids: &[u32]) -> Option<Vec<i32>> {
    ids.iter().map(|&i| i32::try_from(i).ok()).collect()
}

/// `xxh3-128:<hex>` of the tokenizer.json bytes.
pub fn fingerprint(bytes: &[u8]) -> String {
    format!("xxh3-128:{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

type Templates = (Vec<TemplatePiece>, Vec<TemplatePiece>);

fn read_facts(
    json: &Value,
    tok: &Tokenizer,
    bytes: &[u8],
    dir: &Path,
) -> Result<TokenizerFacts, String> {
    let mut notes = Vec::new();
    let id_of = |t: &str| tok.token_to_id(t).and_then(|i| i32::try_from(i).ok());
    let (single_template, pair_template) = match json.get("post_processor") {
        None | Some(Value::Null) => (Vec::new(), Vec::new()),
        Some(pp) => templates(pp, &id_of)?.unwrap_or_else(|| {
            notes.push("post_processor adds no special tokens".into());
            (Vec::new(), Vec::new())
        }),
    };
    let config = read_sibling_config(dir, &mut notes);
    let [unk_id, pad_id, bos_id, eos_id] = special_ids(json, config.as_ref(), &id_of, &mut notes);
    let padding_side = config
        .as_ref()
        .and_then(|c| c.get("padding_side"))
        .and_then(|s| s.as_str())
        .map(String::from)
        .or_else(|| {
            json.pointer("/padding/direction")
                .and_then(|d| d.as_str())
                .map(|d| d.to_ascii_lowercase())
        })
        .unwrap_or_else(|| "right".into());
    let has_token_type_ids = match config
        .as_ref()
        .and_then(|c| c.get("model_input_names"))
        .and_then(|m| m.as_array())
    {
        Some(names) => names.iter().any(|n| n.as_str() == Some("token_type_ids")),
        None => pair_template.iter().any(|p| match p {
            TemplatePiece::Special { type_id, .. } | TemplatePiece::Sequence { type_id, .. } => {
                *type_id != 0
            }
        }),
    };
    Ok(TokenizerFacts {
        fingerprint: fingerprint(bytes),
        model: json
            .pointer("/model/type")
            .and_then(|t| t.as_str())
            .unwrap_or("unknown")
            .to_string(),
        vocab_size: tok.get_vocab_size(true) as u32,
        single_template,
        pair_template,
        has_token_type_ids,
        bos_id,
        eos_id,
        pad_id,
        unk_id,
        padding_side,
        notes,
    })
}

/// The unk, pad, bos and eos ids: named in the tokenizer config (or explicitly null there),
/// else from the model or padding settings, else by conventional names among the added
/// special tokens.
fn special_ids(
    json: &Value,
    config: Option<&serde_json::Map<String, Value>>,
    id_of: &dyn Fn(&str) -> Option<i32>,
    notes: &mut Vec<String>,
) -> [Option<i32>; 4] {
    // A token named in the config (Some(Some(name))), explicitly null (Some(None)), or absent.
    let configured = |key: &str| -> Option<Option<String>> {
        config?.get(key).map(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
            _ => None,
        })
    };
    let added_special: Vec<String> = json
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
        .filter(|t| t.get("special").and_then(|s| s.as_bool()).unwrap_or(false))
        .filter_map(|t| t.get("content").and_then(|c| c.as_str()).map(String::from))
        .collect();
    let conventional = |names: &[&str]| -> Option<i32> {
        names
            .iter()
            .find(|n| added_special.iter().any(|a| a == *n))
            .and_then(|n| id_of(n))
    };
    let mut pick = |key: &str, fallback: Option<i32>, names: &[&str]| -> Option<i32> {
        match configured(key) {
            Some(Some(name)) => {
                let id = id_of(&name);
                notes.push(format!("{key} = {name:?} from tokenizer config"));
                id
            }
            Some(None) => {
                notes.push(format!("{key} is null in tokenizer config"));
                None
            }
            None => fallback.or_else(|| conventional(names)),
        }
    };
    let model_unk = json
        .pointer("/model/unk_token")
        .and_then(|u| u.as_str())
        .and_then(id_of)
        .or_else(|| {
            json.pointer("/model/unk_id")
                .and_then(|u| u.as_i64())
                .and_then(|u| i32::try_from(u).ok())
        });
    let padding_pad = json
        .pointer("/padding/pad_id")
        .and_then(|p| p.as_i64())
        .and_then(|p| i32::try_from(p).ok());
    let unk_id = pick("unk_token", model_unk, &["<unk>", "[UNK]"]);
    let pad_id = pick("pad_token", padding_pad, &["<pad>", "[PAD]", "<|pad|>"]);
    let bos_id = pick("bos_token", None, &["<s>", "<bos>", "<|begin_of_text|>"]);
    let eos_id = pick(
        "eos_token",
        None,
        &["</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"],
    );
    [unk_id, pad_id, bos_id, eos_id]
}

/// tokenizer_config.json merged over special_tokens_map.json, when either exists.
fn read_sibling_config(
    dir: &Path,
    notes: &mut Vec<String>,
) -> Option<serde_json::Map<String, Value>> {
    let mut merged: Option<serde_json::Map<String, Value>> = None;
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        match serde_json::from_slice::<Value>(&text) {
            Ok(Value::Object(o)) => {
                notes.push(format!("read {name}"));
                merged.get_or_insert_with(Default::default).extend(o);
            }
            _ => notes.push(format!("ignored {name}: not a JSON object")),
        }
    }
    merged
}

fn templates(pp: &Value, id_of: &dyn Fn(&str) -> Option<i32>) -> Result<Option<Templates>, String> {
    let kind = pp.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let pair_of = |key: &str| -> Result<i32, String> {
        pp.get(key)
            .and_then(|v| v.get(1))
            .and_then(|v| v.as_i64())
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(|| format!("post_processor {kind}: no `{key}` id"))
    };
    let special = |ids: Vec<i32>, type_id| TemplatePiece::Special { ids, type_id };
    let seq = |id: &str, type_id| TemplatePiece::Sequence {
        id: id.into(),
        type_id,
    };
    match kind {
        "TemplateProcessing" => {
            let specials = pp.get("special_tokens");
            let parse = |key: &str| -> Result<Vec<TemplatePiece>, String> {
                let items = pp
                    .get(key)
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| format!("TemplateProcessing without `{key}`"))?;
                items
                    .iter()
                    .map(|item| {
                        if let Some(s) = item.get("SpecialToken") {
                            let name = s.get("id").and_then(|v| v.as_str()).unwrap_or("");
                            let type_id =
                                s.get("type_id").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
                            let ids = specials
                                .and_then(|m| m.get(name))
                                .and_then(|m| m.get("ids"))
                                .and_then(|v| v.as_array())
                                .map(|a| {
                                    a.iter()
                                        .filter_map(|i| i.as_i64())
                                        .map(|i| i as i32)
                                        .collect()
                                })
                                .or_else(|| id_of(name).map(|i| vec![i]))
                                .ok_or_else(|| format!("template token {name:?} has no id"))?;
                            Ok(special(ids, type_id))
                        } else if let Some(s) = item.get("Sequence") {
                            let id = s.get("id").and_then(|v| v.as_str()).unwrap_or("A");
                            let type_id =
                                s.get("type_id").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
                            Ok(seq(id, type_id))
                        } else {
                            Err(format!("unknown template piece {item}"))
                        }
                    })
                    .collect()
            };
            Ok(Some((parse("single")?, parse("pair")?)))
        }
        "BertProcessing" => {
            let (cls, sep) = (pair_of("cls")?, pair_of("sep")?);
            Ok(Some((
                vec![special(vec![cls], 0), seq("A", 0), special(vec![sep], 0)],
                vec![
                    special(vec![cls], 0),
                    seq("A", 0),
                    special(vec![sep], 0),
                    seq("B", 1),
                    special(vec![sep], 1),
                ],
            )))
        }
        "RobertaProcessing" => {
            let (cls, sep) = (pair_of("cls")?, pair_of("sep")?);
            Ok(Some((
                vec![special(vec![cls], 0), seq("A", 0), special(vec![sep], 0)],
                vec![
                    special(vec![cls], 0),
                    seq("A", 0),
                    special(vec![sep, sep], 0),
                    seq("B", 0),
                    special(vec![sep], 0),
                ],
            )))
        }
        "Sequence" => {
            for p in pp
                .get("processors")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(t) = templates(p, id_of)? {
                    return Ok(Some(t));
                }
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}
