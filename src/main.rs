//! The `otako-gateway` binary: clap verbs over the library (DESIGN §6).
//! Every failure ends as one line on stderr and a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use newplugin::Lang;

use otako_gateway::config::Config;
use otako_gateway::ids::UserId;
use otako_gateway::plugin::Plugins;
use otako_gateway::token::{self, TokenKey};
use otako_gateway::{api, dev, gateway, logsink, revoke, shutdown, sys, telemetry};

mod newplugin;

/// Per-thread heaps: glibc's allocator spent a quarter of the CPU of an
/// event (free-list consolidation, arena locks) under the chat mix.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "otako-gateway",
    version,
    about = "Realtime event gateway with WebAssembly plugins"
)]
struct Cli {
    /// Path to gateway.toml.
    #[arg(long, global = true, default_value = "gateway.toml")]
    config: PathBuf,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Run the gateway.
    Serve,
    /// Run the reference HTTP backend.
    Api,
    /// Gateway, reference backend and file log sink in one process.
    Dev,
    /// Validate the config and load every routed plugin, serving nothing.
    Check,
    /// Apply pending database migrations.
    Migrate,
    /// Client tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Scaffold a plugin under plugins/, build it and route it in gateway.toml.
    NewPlugin {
        /// The plugin's name: its folder and `plugins/NAME.wasm`.
        name: String,
        /// The dispatch event it handles (default: EVENT_<NAME>).
        #[arg(long)]
        event: Option<String>,
        /// The guest language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: Lang,
    },
    /// A reference logging server: appends each POSTed JSON document to a file.
    LogSink {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// File to append JSON lines to.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Print a token for a user.
    Issue {
        /// The user id (a positive decimal integer).
        #[arg(long)]
        user: UserId,
    },
    /// Revoke every token of a user issued so far (this second included);
    /// open sessions close with 4004.
    Revoke {
        /// The user id (a positive decimal integer).
        #[arg(long)]
        user: UserId,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing();
    otako_gateway::db::tune_sqlite();
    // Each client session holds a socket: don't stop at the soft default.
    match sys::raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("otako-gateway: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("otako-gateway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.verb {
        Verb::Serve => {
            let config = Config::load(&cli.config)?;
            gateway::serve(config, shutdown::signal(), announce).await?;
        }
        Verb::Check => {
            let config = Config::load(&cli.config)?;
            config.require_secrets()?;
            println!(
                "{}: ok ({} route(s), database {})",
                cli.config.display(),
                config.routes.len(),
                config.database.url
            );
            let statuses = Plugins::check(&config).await;
            for status in &statuses {
                println!("{status}");
            }
            let failed = statuses.iter().filter(|s| !s.is_ok()).count();
            if failed > 0 {
                anyhow::bail!("{failed} of {} plugin(s) failed to load", statuses.len());
            }
        }
        Verb::Migrate => {
            let config = Config::load(&cli.config)?;
            let db = gateway::open_database(&config).await?;
            println!(
                "migrations applied to {} ({})",
                config.database.url,
                db.backend()
            );
            db.close().await;
        }
        Verb::Token {
            action: TokenAction::Issue { user },
        } => {
            let config = Config::load(&cli.config)?;
            let (secret, _) = config.require_secrets()?;
            let key = TokenKey::new(
                secret.expose().as_bytes(),
                config.auth.token_ttl_s.map(|t| t.get()),
            );
            println!("{}", key.issue(user, token::now_s()));
        }
        Verb::Token {
            action: TokenAction::Revoke { user },
        } => {
            let config = Config::load(&cli.config)?;
            let db = gateway::open_database(&config).await?;
            let revoked = revoke::revoke(&db, user).await;
            db.close().await;
            let revoked = revoked?;
            if !revoked.known_user {
                eprintln!(
                    "otako-gateway: note: user {user} is not in the users table; its tokens are revoked all the same"
                );
            }
            println!(
                "revoked every token of user {user} issued at or before {} (unix seconds); its open sessions close with 4004",
                revoked.revoked_at
            );
        }
        Verb::LogSink { listen, out } => {
            let signalled = shutdown::signal();
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let bound = listener.local_addr().unwrap_or(listen);
            println!(
                "otako-gateway log-sink listening http://{bound} -> {}",
                out.display()
            );
            let stop = shutdown::Shutdown::new();
            let server = tokio::spawn(logsink::serve(listener, out, stop.clone()));
            signalled.await;
            stop.drain().await;
            let _ = server.await;
        }
        Verb::Api => {
            let config = Config::load(&cli.config)?;
            config.require_secrets()?;
            let db = gateway::open_database(&config).await?;
            let scheme = if config.api.tls.is_some() {
                "https"
            } else {
                "http"
            };
            api::run(
                &config,
                db.clone(),
                api::GatewayUrls::default(),
                shutdown::signal(),
                |addr| {
                    println!("otako-gateway api listening {scheme}://{addr}");
                },
            )
            .await?;
            db.close().await;
        }
        Verb::NewPlugin { name, event, lang } => {
            let created = tokio::task::spawn_blocking(move || {
                newplugin::run(&cli.config, &name, event.as_deref(), lang)
            })
            .await??;
            println!("{created}");
        }
        Verb::Dev => {
            let config = Config::load(&cli.config)?;
            dev::run(config, shutdown::signal()).await?;
        }
    }
    Ok(())
}

/// Prints the bound addresses on stdout: one line scripts and tests read.
fn announce(bound: gateway::Bound, _: &Plugins) {
    println!("otako-gateway listening {bound}");
}
