//! `fleet-service`: parses settings, installs logging, runs the platform until Ctrl-C/SIGTERM.

use clap::Parser;
use fleet_service::app::App;
use fleet_service::config::{Cli, Command, Config, Role, DEFAULT_TUNING};

/// jemalloc instead of glibc's malloc: about 13 KiB less RSS per idle device connection, and
/// freed memory goes back to the system over time (benchmarks/README.md, memory per connection).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (args, role) = match cli.command {
        Command::PrintConfig => {
            print!("{DEFAULT_TUNING}");
            return std::process::ExitCode::SUCCESS;
        }
        Command::Serve(args) => (args, Role::All),
        Command::Broker(args) => (args, Role::Broker),
        Command::Api(args) => (args, Role::Api),
    };
    install_logging();
    match run(args, role).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-service: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by RUST_LOG; the router-loss counter sees every event regardless.
fn install_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=warn,sqlx=warn".into());
    tracing_subscriber::registry()
        .with(broker::RouterLossLayer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only for a terminal, never into a log file or a journal.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter),
        )
        .init();
}

async fn run(args: fleet_service::config::ServeArgs, role: Role) -> anyhow::Result<()> {
    let config = Config::for_role(args, role)?;
    let app = App::start(config).await?;
    println!("{}", app.banner());
    shutdown_signal().await;
    eprintln!("fleet-service: shutting down");
    app.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
