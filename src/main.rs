//! The `tempalias` binary: everything lives in the library; this only reports
//! the top-level error and sets the exit code.

fn main() -> std::process::ExitCode {
    tempalias::cli::main()
}
