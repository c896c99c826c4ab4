//! The `presence` binary: the allocator, the runtime, and the command line (see [`presence::cli`]).
use std::process::ExitCode;

/// mimalloc rather than glibc malloc: cheaper for the many small, short-lived allocations of
/// stream set-up, and it returns memory after a wave of devices leaves.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = presence::cli::parse();
    presence::telemetry::init_logs(cli.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // A task woken by a running task normally runs right after it (the LIFO slot). Under
    // fan-out that made every HTTP/2 connection task run, and write, after each one of its
    // streams queued a frame: one writev per delivery, whatever the wake-up batching. Without
    // the slot, the connection tasks run after the batch's streams and write theirs together.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    match builder.build() {
        Ok(runtime) => runtime.block_on(presence::cli::run(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}
