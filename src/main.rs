//! `holdfast [serve|migrate|audit|loadgen]`: parse flags, run, and turn any start-up failure
//! into one line on stderr and exit code 2.

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use holdfast::config::{self, Cli, Command, Settings};
use holdfast::startup::{open_existing_store, open_store, payment_gateway, Application};
use holdfast::{audit, loadgen, shutdown, telemetry};

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches).map(|cli| (matches, cli)));
    let (matches, mut cli) = match parsed {
        Ok(parsed) => parsed,
        // `--help` and `--version` are answers, not errors: clap prints them and exits 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("holdfast: {}", config::error_line(&e));
            return ExitCode::from(2);
        }
    };
    // The load generator audits only a store the user named, not the default directory.
    if let Some(Command::Loadgen(args)) = &mut cli.command {
        args.store_flags_given = loadgen::store_flags_given(&matches);
    }
    let settings = match Settings::from_flags(&cli.flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("holdfast: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log_format);
    telemetry::raise_open_file_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("holdfast: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    match runtime.block_on(run(command, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("holdfast: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve => {
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown::signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            open_store(&settings).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Loadgen(args) => loadgen::run(args, &settings).await,
        Command::Audit => {
            // A live database is read as it is; migrating it is `holdfast migrate`'s decision.
            let store = open_existing_store(&settings).await?;
            // Promise 3 is checked against Stripe when a key is configured; the simulator's
            // ledger lives inside the serving process, so the command skips it there.
            let (gateway, simulator) = payment_gateway(&settings)?;
            let options = audit::AuditOptions {
                gateway: simulator.is_none().then_some(gateway.as_ref()),
                ..audit::AuditOptions::default()
            };
            let report = audit::run_with(store.as_ref(), options).await?;
            print!("{report}");
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
