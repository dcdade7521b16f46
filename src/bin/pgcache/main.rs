//! The `pgcache` command.

use clap::{Parser, Subcommand};

#[cfg(feature = "bench")]
mod bench;

/// PostgreSQL as the application cache.
#[derive(Debug, Parser)]
#[command(name = "pgcache", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure the cache against raw prepared SQL (and Redis) on this database.
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match cli.command {
        #[cfg(feature = "bench")]
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Some clients' errors say little until their cause: print the chain.
            let mut message = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("pgcache: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
