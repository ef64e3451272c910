//! The command line: every subcommand reads the same configuration as
//! `serve`, so run from the same directory it finds the same data.

use clap::{Args, Parser, Subcommand};

use crate::app::{shutdown_signal, AppState, Application};
use crate::auth::{Role, TokenIssuer};
use crate::config::Config;
use crate::domain::CarrierId;

#[derive(Parser, Debug)]
#[command(
    name = "transfer-ledger",
    version,
    about = "System of record for personal data crossing between a telecom platform and its carriers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP service.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Tokens for the configured HS256 secret.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print one signed token on stdout.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// privacy_officer, carrier, platform, retention_sweeper, auditor or admin.
    #[arg(long)]
    pub role: String,
    /// The carrier (required with --role carrier).
    #[arg(long)]
    pub carrier: Option<String>,
    /// The subject; defaults to the role (and carrier).
    #[arg(long)]
    pub sub: Option<String>,
    /// Lifetime, e.g. 15m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    match cli.command {
        Command::Serve => {
            let app = Application::build(config).await?;
            app.run_until(shutdown_signal()).await
        }
        Command::Migrate => {
            let state = AppState::init(config).await?;
            println!("migrations applied ({})", state.db.backend());
            Ok(())
        }
        Command::Token(TokenCommand::Issue(args)) => {
            println!("{}", issue_token(&config, &args)?);
            Ok(())
        }
    }
}

fn issue_token(config: &Config, args: &IssueArgs) -> anyhow::Result<String> {
    let role: Role = args
        .role
        .parse()
        .map_err(|_| anyhow::anyhow!("--role must be one of: {}", Role::expected()))?;
    let carrier = match (role, &args.carrier) {
        (Role::Carrier, None) => anyhow::bail!("--carrier is required with --role carrier"),
        (Role::Carrier, Some(c)) => {
            Some(CarrierId::parse(c).map_err(|e| anyhow::anyhow!("--carrier {e}"))?)
        }
        (_, Some(_)) => anyhow::bail!("--carrier is only for --role carrier"),
        (_, None) => None,
    };
    let ttl = humantime::parse_duration(&args.ttl)
        .map_err(|_| anyhow::anyhow!("--ttl must be a duration such as 15m or 1h"))?;
    anyhow::ensure!(
        !ttl.is_zero() && ttl.as_secs() <= 366 * 86400,
        "--ttl must be between 1s and 366 days"
    );
    let sub = args.sub.clone().unwrap_or_else(|| match &carrier {
        Some(c) => format!("{role}:{c}"),
        None => role.to_string(),
    });
    let secrets = config.secrets()?;
    let issuer = TokenIssuer::hs256(
        &secrets.jwt_secret,
        &config.jwt_issuer,
        &config.jwt_audience,
    );
    issuer.issue(&sub, role, carrier.as_ref().map(CarrierId::as_str), ttl)
}
