//! `leuknet-server`: the LeukNet REST service. See `--help` and README.md.

use clap::Parser;
use leuknet::config::{LogFormat, ServerConfig};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = ServerConfig::parse();
    // Before any thread starts (logging, ONNX Runtime, tokio): see leuknet::malloc.
    let arenas = leuknet::malloc::limit_arenas(config.malloc_arenas);
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    match arenas {
        Ok(limit) => tracing::info!(?limit, "malloc arenas"),
        Err(e) => tracing::warn!("malloc arenas left at glibc's default: {e}"),
    }

    let (card, engine) = match leuknet::server::load(&config) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("leuknet-server: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        model = %card.name,
        version = %card.version,
        sha256 = %card.sha256,
        provider = engine.provider(),
        "model loaded"
    );
    if let Err(e) = config.band(&card) {
        eprintln!("leuknet-server: {e}");
        return ExitCode::from(2);
    }
    if card.fixture {
        tracing::warn!("serving a RANDOM-WEIGHT test fixture: its answers mean nothing");
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("leuknet-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
        if let Ok(addr) = listener.local_addr() {
            // One stable line on stdout, so people and scripts know where to connect.
            println!("leuknet-server listening on http://{addr}");
        }
        leuknet::server::run(
            &config,
            card,
            engine,
            listener,
            leuknet::shutdown::os_signal(),
        )
        .await
        .map_err(|e| e.to_string())
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leuknet-server: {e}");
            ExitCode::FAILURE
        }
    }
}
