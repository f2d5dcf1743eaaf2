//! The `keyraft` binary: everything is in [`keyraft::cli`].

fn main() -> std::process::ExitCode {
    keyraft::cli::main()
}
