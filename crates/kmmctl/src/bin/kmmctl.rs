//! `kmmctl`: see the crate documentation.

fn main() -> std::process::ExitCode {
    kmmctl::cli::main()
}
