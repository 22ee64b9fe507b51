//! The flagwrite binary: parses the configuration, sets up tracing, binds
//! and hands over to `flagwrite::run`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    if flagstream::kit::healthcheck::requested() {
        return flagstream::kit::healthcheck::main_blocking("flagwrite");
    }
    let config = match flagwrite::Config::try_parse() {
        Ok(config) => config,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            // clap's message spans several lines; the first says it all.
            let message = e.to_string();
            let first = message.lines().next().unwrap_or("invalid arguments");
            eprintln!("flagwrite: {}", first.trim_start_matches("error: "));
            return std::process::ExitCode::from(2);
        }
    };
    flagstream::kit::telemetry::init(config.log_format);
    // Bad configuration is reported before anything is bound.
    if let Err(e) = config.prepare() {
        eprintln!("flagwrite: {e}");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("flagwrite: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = flagstream::kit::shutdown::signal();
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("flagwrite: cannot listen on {}: {e}", config.listen);
                return std::process::ExitCode::FAILURE;
            }
        };
        match flagwrite::run(listener, config, shutdown).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flagwrite: {e}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}
