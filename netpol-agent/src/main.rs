use clap::Parser;
use netpol_agent::cli::Command;

fn main() {
    let cli = netpol_agent::cli::Cli::parse();
    // The one-shot tools report rejected objects themselves: the index need not log them.
    let default = match cli.command {
        Command::Lint(_) | Command::Graph(_) => "warn,netpol_engine::index=error",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NETPOL_LOG")
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        // Logs often go to a file (the lab's agent and supervisor logs): no colours there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match netpol_agent::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
