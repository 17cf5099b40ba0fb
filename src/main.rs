//! The `tempalias` binary: everything lives in the library; this only reports
//! the top-level error and sets the exit code.

/// mimalloc instead of glibc's malloc: the store's page cache is filled and
/// evicted from many threads (tokio's workers and blocking pool), and glibc
/// keeps an arena per thread that it rarely gives back, so a node with a
/// 64 MiB cache grew to several hundred MiB of fragmented heap under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tempalias::cli::main()
}
