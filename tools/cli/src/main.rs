//! The `rankfeed` command line (see the `rankfeed_cli` library).

/// glibc malloc returns freed batch buffers (hundreds of KB) to the kernel and page-faults them
/// back in on the next batch; mimalloc keeps them, which is worth ~1.5-2x on large batches.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(rankfeed_cli::run(std::env::args_os()))
}
