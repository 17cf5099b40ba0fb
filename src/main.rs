//! The `tempalias` binary: everything lives in the library; this only reports
//! the top-level error and sets the exit code.

/// mimalloc instead of glibc's malloc: a status read allocates a few dozen
/// small blocks on two runtime threads, and glibc's arenas (locking,
/// consolidation) were about a tenth of the CPU a read cost; and the store's
/// page cache is filled and evicted from many threads, where glibc's
/// per-thread arenas grew a node with a 64 MiB cache to several hundred MiB
/// of fragmented heap (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tempalias::cli::main()
}
