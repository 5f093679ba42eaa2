//! The `walbridge` command line. Errors are reported here, at the edge, with their context.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "walbridge",
    version,
    about = "Stream a legacy Postgres monolith's changes into Kafka as Avro events"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log as text lines or as JSON objects (default: `log.format` of the config for `run`,
    /// else text).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Stream changes from the source into Kafka until SIGINT/SIGTERM.
    Run {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
    },
    /// Validate the config and exit, starting nothing.
    Check {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
    },
    /// Copy tables again while the pipeline streams (rows arrive as op r, in stream order).
    Snapshot {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
        /// A captured table, as schema.table (repeat for more).
        #[arg(long = "table", required = true)]
        tables: Vec<String>,
    },
    /// Show a running instance's state, read from its metrics endpoint.
    Status {
        /// The instance's metrics endpoint (default: metrics.listen of --config, else
        /// http://127.0.0.1:9187).
        #[arg(long)]
        url: Option<String>,
        /// Read the endpoint's address from this config's metrics.listen.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Business-event contracts (`avro/contracts/*.avsc`) and the `events:` mappings.
    Contracts {
        #[command(subcommand)]
        command: ContractsCommand,
    },
    /// Inspect the source and say what to change and why (read-only).
    Doctor {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
    },
    /// The simulated legacy OMS/WMS monolith.
    Legacy {
        #[command(subcommand)]
        command: LegacyCommand,
    },
    /// Run walbridge's Confluent-compatible schema registry on its own.
    Registry {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = ".walbridge/registry")]
        data_dir: PathBuf,
        /// Require HTTP basic auth for writes, with the "user:password" in this file (reads
        /// stay open). Clients put the credentials in their registry URL.
        #[arg(long)]
        write_auth_file: Option<PathBuf>,
    },
    /// Print the events in the pipeline's topics, decoded through the registry.
    Tail {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
        /// Only this table (`schema.table`).
        #[arg(long)]
        table: Option<String>,
        /// How many events to print (the last ones).
        #[arg(long, default_value_t = 5)]
        limit: usize,
    },
    /// Changes that could not be encoded (the dead-letter topic): list them, or replay them
    /// after a fix.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Compare what is in Kafka with the source tables: lost, extra and differing rows, and
    /// duplicate deliveries. Exits 0 when equal, 1 when they differ, 2 when it cannot tell.
    Verify {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
        /// Only this table, as schema.table (repeat for more; default: every captured table).
        #[arg(long = "table")]
        tables: Vec<String>,
        /// How long to wait for the pipeline to catch up with the source first (0: compare at
        /// once, whatever is confirmed).
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The demo: a throwaway legacy database, broker and registry, the pipeline, and a workload.
    Demo {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
    },
    /// Keep the live views (stock availability, reconciliation, Customer-360) from the change
    /// topics, with checkpoints, until SIGINT/SIGTERM (needs a `processors:` section).
    Process {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
    },
    /// The live views: compare them with SQL on the source, or measure the processors.
    Views {
        #[command(subcommand)]
        command: ViewsCommand,
    },
    /// Throughput and latency against pg_recvlogical on the same WAL.
    Bench {
        #[arg(long, default_value_t = 200_000)]
        rows: u64,
        #[arg(long, default_value_t = 500.0)]
        latency_rate: f64,
        #[arg(long, default_value_t = 10)]
        latency_seconds: u64,
        /// Also stream one transaction of this many rows and report walbridge's peak RSS
        /// (0 skips it; 5000000 is the figure the design asks about).
        #[arg(long, default_value_t = 0)]
        big_tx_rows: u64,
        /// Also snapshot a table of this many rows and compare with COPY (0 skips it).
        #[arg(long, default_value_t = 0)]
        snapshot_rows: u64,
    },
}

#[derive(Subcommand)]
enum ContractsCommand {
    /// Check that every mapping yields records valid under its contract (types from the source
    /// catalog) and that every contract is compatible with the registry's versions. Exits
    /// non-zero on any problem: run it in CI before a deploy.
    Check {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
        /// Skip the type check against the source database's columns.
        #[arg(long)]
        no_db: bool,
        /// Skip the compatibility check against the registry.
        #[arg(long)]
        no_registry: bool,
    },
}

#[derive(Subcommand)]
enum ViewsCommand {
    /// Compute every view from the checkpoint and the topics, and by plain SQL on the source at
    /// one LSN; print equal or the differing keys (exit 1 when they differ).
    Check {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
        /// How long to wait for the pipeline to confirm the LSN the SQL saw.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
    /// Processor throughput: the fold on pre-decoded events, and (with --config) end to end
    /// from the change topics.
    Bench {
        #[arg(long, default_value_t = 2_000_000)]
        events: u64,
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Also measure commit → visible in SQL on a throwaway stack under the demo's workload
        /// for this long (0 skips it; -c names the config to take events and processors from,
        /// default pipelines.yaml).
        #[arg(long, default_value_t = 0)]
        latency_seconds: u64,
        /// The workload's offered transactions per second (spike profile, as `walbridge demo`).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// How often a probe polls the SQL endpoint for its change (the latency's resolution).
        #[arg(long, default_value_t = 5)]
        poll_ms: u64,
        /// Pause between one probe becoming visible and the next probe's commit.
        #[arg(long, default_value_t = 100)]
        probe_gap_ms: u64,
        /// Also time the WAL alone: pg_recvlogical (test_decoding) on a second slot receives each
        /// probe. A second walsender decodes the same WAL, so every other figure gets slower.
        #[arg(long)]
        wal_floor: bool,
        /// Time only the floors under the same workload, with walbridge not running: the WAL
        /// alone (the only decoder of the WAL) and the broker alone.
        #[arg(long)]
        floors_only: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Print the dead letters waiting (table, commit LSN, event id, op, reason).
    List {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
        /// How many to print (the last ones).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Re-encode waiting dead letters with their table's current shape and produce them to the
    /// table's topic under the same event id (after changing the column type, or upgrading).
    Replay {
        #[arg(short, long, default_value = "pipelines.yaml")]
        config: PathBuf,
        /// Only this event id (repeat for more); default: every waiting letter.
        #[arg(long = "event-id")]
        event_ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum LegacyCommand {
    /// Create the oms/wms schemas (dropping existing ones) and load seed data.
    Init {
        #[arg(long)]
        dsn: String,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        products: u32,
        #[arg(long, default_value_t = 50_000)]
        customers: u32,
        #[arg(long, default_value_t = 20)]
        locations: u32,
    },
    /// Drive the monolith through its own SQL at a chosen rate.
    Simulate {
        #[arg(long)]
        dsn: String,
        /// Transactions per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = ProfileArg::Steady)]
        profile: ProfileArg,
        /// Stop after this many transactions (for reproducible runs).
        #[arg(long)]
        max_transactions: Option<u64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProfileArg {
    Steady,
    Spike,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<walbridge::verify::Differences>() => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(cli: &Cli) {
    let json = match cli.log_format {
        Some(f) => matches!(f, LogFormatArg::Json),
        // A config that does not load is reported by the command itself, after this.
        None => match &cli.command {
            Command::Run { config } => walbridge::config::load(config)
                .is_ok_and(|c| c.log.format == walbridge::config::LogFormat::Json),
            _ => false,
        },
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| walbridge::snapshot::LogWriter);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
}

fn load_config(path: &std::path::Path) -> anyhow::Result<walbridge::config::Config> {
    walbridge::config::load(path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))
}

async fn dispatch(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Run { config } => {
            let cfg = load_config(&config)?;
            walbridge::pipeline::run(cfg, shutdown_signal()).await
        }
        Command::Check { config } => {
            let cfg = load_config(&config)?;
            println!(
                "{}: ok — source {}, {} table selector(s), topics {}.<schema>.<table> on {}",
                config.display(),
                cfg.source.dsn.redacted(),
                cfg.source.tables.len(),
                cfg.kafka.topic_prefix,
                cfg.kafka.bootstrap_servers()
            );
            Ok(())
        }
        Command::Legacy { command } => legacy(command).await,
        Command::Snapshot { config, tables } => {
            let cfg = load_config(&config)?;
            let id = walbridge::snapshot::request(&cfg, &tables).await?;
            println!(
                "snapshot of {} requested (signal {id}); the pipeline on slot {} copies it at its current stream position",
                tables.join(", "),
                cfg.source.slot
            );
            Ok(())
        }
        Command::Status { url, config } => {
            let url = match (url, config) {
                (Some(u), _) => u,
                (None, Some(path)) => {
                    let cfg = load_config(&path)?;
                    let m = cfg.metrics.with_context(|| {
                        format!(
                            "{} has no metrics section; add metrics: {{ listen: \"127.0.0.1:9187\" }} or pass --url",
                            path.display()
                        )
                    })?;
                    format!("http://{}", m.listen)
                }
                (None, None) => "http://127.0.0.1:9187".to_owned(),
            };
            let report = walbridge::status::collect(&url, Duration::from_secs(1)).await?;
            print!("{}", report.render());
            Ok(())
        }
        Command::Contracts {
            command:
                ContractsCommand::Check {
                    config,
                    no_db,
                    no_registry,
                },
        } => {
            let cfg = load_config(&config)?;
            if !walbridge::events::check::run(&cfg, !no_db, !no_registry).await? {
                anyhow::bail!("contracts check failed (see the FAIL lines)");
            }
            Ok(())
        }
        Command::Doctor { config } => {
            let cfg = load_config(&config)?;
            let findings = walbridge::doctor::inspect(&cfg).await?;
            print!("{}", walbridge::doctor::render(&findings));
            if findings
                .iter()
                .any(|f| f.level == walbridge::doctor::Level::Fail)
            {
                anyhow::bail!("the source is not ready for walbridge (see the FAIL lines)");
            }
            Ok(())
        }
        Command::Registry {
            listen,
            data_dir,
            write_auth_file,
        } => {
            let mut server = avro::RegistryServer::open(&data_dir)
                .with_context(|| format!("opening the registry store in {}", data_dir.display()))?;
            if let Some(path) = write_auth_file {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading --write-auth-file {}", path.display()))?;
                let text = text.trim_end_matches(['\n', '\r']);
                let Some((user, password)) = text
                    .split_once(':')
                    .filter(|(u, p)| !u.is_empty() && !p.is_empty())
                else {
                    anyhow::bail!(
                        "{} must hold \"user:password\" (both non-empty)",
                        path.display()
                    );
                };
                server = server.with_write_auth(user, password);
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let running = server.spawn(listener)?;
            println!("schema registry listening on {}", running.url());
            shutdown_signal().await;
            Ok(())
        }
        Command::Tail {
            config,
            table,
            limit,
        } => {
            let cfg = load_config(&config)?;
            walbridge::demo::print_tail(&cfg, table.as_deref(), limit).await
        }
        Command::Dlq { command } => dlq(command).await,
        Command::Verify {
            config,
            tables,
            wait_secs,
            json,
        } => {
            let cfg = load_config(&config)?;
            let opts = walbridge::verify::Options {
                tables,
                wait: Duration::from_secs(wait_secs),
                ..walbridge::verify::Options::default()
            };
            let report = walbridge::verify::verify(&cfg, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            match report.differences() {
                0 => Ok(()),
                n => Err(walbridge::verify::Differences(n).into()),
            }
        }
        Command::Process { config } => {
            let cfg = load_config(&config)?;
            if cfg.processors.is_none() {
                anyhow::bail!(
                    "{} has no processors section; add processors: {{ group_id: walbridge_views }}",
                    config.display()
                );
            }
            let process = walbridge::process::start(&cfg).await?;
            let stopper = process.stopper();
            tokio::spawn(async move {
                shutdown_signal().await;
                stopper.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            process.join().await?;
            Ok(())
        }
        Command::Views { command } => match command {
            ViewsCommand::Check { config, wait_secs } => {
                let cfg = load_config(&config)?;
                let pc = cfg
                    .processor_config()
                    .with_context(|| format!("{} has no processors section", config.display()))?;
                let report = transforms::check::check(
                    &pc,
                    &cfg.source.pg_config(),
                    &cfg.source.slot,
                    Duration::from_secs(wait_secs),
                )
                .await?;
                print!("{}", report.render());
                if !report.equal() {
                    anyhow::bail!("the stream's views differ from SQL on the source (see above)");
                }
                Ok(())
            }
            ViewsCommand::Bench {
                events,
                config,
                latency_seconds,
                rate,
                poll_ms,
                probe_gap_ms,
                wal_floor,
                floors_only,
            } => {
                if latency_seconds > 0 {
                    // The fold figure first, before the stack competes for the cores.
                    transforms::bench::run(events, None).await?;
                    return walbridge::views_bench::run(walbridge::views_bench::LatencyOptions {
                        config: config.unwrap_or_else(|| PathBuf::from("pipelines.yaml")),
                        duration: Duration::from_secs(latency_seconds),
                        rate,
                        poll: Duration::from_millis(poll_ms),
                        probe_gap: Duration::from_millis(probe_gap_ms),
                        wal_floor,
                        floors_only,
                    })
                    .await;
                }
                let pc = match config {
                    Some(c) => {
                        Some(load_config(&c)?.processor_config().with_context(|| {
                            format!("{} has no processors section", c.display())
                        })?)
                    }
                    None => None,
                };
                transforms::bench::run(events, pc).await?;
                Ok(())
            }
        },
        Command::Demo { seconds, rate } => {
            walbridge::demo::run(Duration::from_secs(seconds), rate).await
        }
        Command::Bench {
            rows,
            latency_rate,
            latency_seconds,
            big_tx_rows,
            snapshot_rows,
        } => {
            walbridge::bench::run(
                rows,
                latency_rate,
                Duration::from_secs(latency_seconds),
                big_tx_rows,
                snapshot_rows,
            )
            .await
        }
    }
}

async fn dlq(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List { config, limit } => {
            let cfg = load_config(&config)?;
            walbridge::dlq::print_list(&cfg, limit).await
        }
        DlqCommand::Replay { config, event_ids } => {
            let cfg = load_config(&config)?;
            let outcomes = walbridge::dlq::replay(&cfg, &event_ids).await?;
            let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
            for o in &outcomes {
                match &o.result {
                    Ok(()) => println!("replayed {} ({})", o.event_id, o.table),
                    Err(why) => println!("failed   {} ({}): {why}", o.event_id, o.table),
                }
            }
            println!(
                "{} replayed, {failed} still dead letters",
                outcomes.len() - failed
            );
            if failed > 0 {
                anyhow::bail!("{failed} dead letter(s) could not be replayed (see above)");
            }
            Ok(())
        }
    }
}

async fn legacy(cmd: LegacyCommand) -> anyhow::Result<()> {
    let connect = |dsn: String| async move {
        // The same DSN rules (and TLS) as source.dsn.
        let dsn = walbridge::config::Dsn::parse(&dsn).map_err(|e| anyhow::anyhow!("--dsn: {e}"))?;
        let (client, conn) = dsn
            .pg_config()
            .connect(dsn.tls().clone())
            .await
            .context("connecting to the legacy database")?;
        tokio::spawn(conn);
        anyhow::Ok(client)
    };
    match cmd {
        LegacyCommand::Init {
            dsn,
            seed,
            products,
            customers,
            locations,
        } => {
            let client = connect(dsn).await?;
            let opts = legacy_fixtures::InitOptions {
                seed,
                products,
                customers,
                locations,
            };
            let report = legacy_fixtures::init(&client, &opts).await?;
            for (table, rows) in &report.rows {
                println!("{table:<24} {rows:>9} rows");
            }
            println!(
                "loaded {} rows in {:.1?}",
                report.total_rows(),
                report.elapsed
            );
        }
        LegacyCommand::Simulate {
            dsn,
            rate,
            duration,
            seed,
            profile,
            max_transactions,
        } => {
            let client = connect(dsn).await?;
            let opts = legacy_fixtures::SimulateOptions {
                seed,
                rate,
                duration: Duration::from_secs(duration),
                profile: match profile {
                    ProfileArg::Steady => legacy_fixtures::Profile::Steady,
                    ProfileArg::Spike => legacy_fixtures::Profile::Spike,
                },
                max_transactions,
            };
            let report = legacy_fixtures::simulate(&client, &opts).await?;
            for (kind, n) in &report.counts {
                println!("{:<24} {n:>9}", kind.as_str());
            }
            println!(
                "{} transactions ({} skipped) in {:.1?}: {:.0} tx/s",
                report.transactions, report.skipped, report.elapsed, report.achieved_rate
            );
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
