//! `kubectl-kmm`: kmmctl as a kubectl plugin (`kubectl kmm explain ...`).

fn main() -> std::process::ExitCode {
    kmmctl::cli::main()
}
