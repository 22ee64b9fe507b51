//! The flagread binary: parses the configuration, sets up tracing, binds the listener and hands
//! over to `flagread::run` until SIGTERM or SIGINT.

use std::process::ExitCode;

/// mimalloc instead of the system allocator: evaluation answers are built from many small
/// allocations, and glibc's malloc/free took about a third of the CPU of an `EvaluateAll` call.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    if flagstream::kit::healthcheck::requested() {
        return flagstream::kit::healthcheck::main("flagread").await;
    }
    let config = flagread::Config::from_args();
    flagstream::kit::telemetry::init(config.log_format);
    if let Err(error) = config.check() {
        eprintln!("flagread: {error}");
        return ExitCode::FAILURE;
    }
    // Install the signal handlers before binding, so a SIGTERM that arrives
    // while starting up still drains instead of killing the process.
    let shutdown = flagstream::kit::shutdown::signal();
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("flagread: cannot bind {}: {error}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    match flagread::run(listener, config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flagread: {error}");
            ExitCode::FAILURE
        }
    }
}
