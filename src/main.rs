//! The `modelpress` binary: `serve` (API + workers), `worker` (workers only), `migrate`, `keys`, and
//! `compress` (the job pipeline offline, with no database; workers run it as their child process).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use modelpress::compress::Recipe;
use modelpress::config::Config;
use modelpress::eval::dataset::{EvaluationOptions, Task};
use modelpress::eval::{LazyRuntime, Runtime};
use modelpress::pipeline::{self, PipelineError, PipelineInput};
use modelpress::service::{self, ServiceOptions};
use modelpress::worker::events::Event;
use modelpress::{db, telemetry};

#[derive(Parser)]
#[command(name = "modelpress", version, about = "ONNX model compression as a service")]
struct Cli {
    /// A TOML file layered over the built-in defaults (config/default.toml documents every key).
    #[arg(long, global = true, env = "MODELPRESS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    Api,
    Worker,
    All,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API (and, unless disabled, job workers).
    Serve {
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Serve the API only; run workers elsewhere with `modelpress worker` (same as --role api).
        #[arg(long)]
        no_worker: bool,
        /// api: HTTP only; worker: job workers only; all: both (default). Any number of API and
        /// worker processes can share one database and one store.
        #[arg(long, value_enum, default_value = "all")]
        role: Role,
    },
    /// Run job workers only.
    Worker {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage API keys (auth.mode = "api_key"): each key acts for one tenant.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Run a recipe on a model file and write model.onnx and report.json to --out, offline.
    Compress {
        model: PathBuf,
        /// The recipe as JSON, e.g. '[{"pass": "optimize", "level": "extended"}]', or @FILE.
        #[arg(long, required_unless_present = "goal", conflicts_with = "goal")]
        recipe: Option<String>,
        /// A goal for the advisor instead of a recipe, e.g. '{"objective": "smallest"}', or @FILE.
        #[arg(long)]
        goal: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// Recorded in the report when a worker runs this for a job.
        #[arg(long)]
        job_id: Option<uuid::Uuid>,
        /// Print progress and errors as JSON lines on stdout (the worker protocol).
        #[arg(long)]
        events: bool,
        /// Evaluate on this NumPy .npz dataset (arrays keyed by input name) instead of synthetic inputs.
        #[arg(long)]
        dataset: Option<PathBuf>,
        /// classification, regression or generic (fidelity only).
        #[arg(long, default_value = "generic")]
        task: String,
        /// The dataset array holding the labels.
        #[arg(long, default_value = "labels")]
        label_key: String,
        /// cpu or cuda (default from eval.execution_provider).
        #[arg(long)]
        provider: Option<String>,
        /// All evaluation options as JSON (what a worker passes); overrides the flags above.
        #[arg(long, hide = true)]
        evaluation: Option<String>,
        /// Only run the recipe's passes: write model.onnx and passes.json (each pass's time and
        /// notes, this process's peak memory) without measuring either model. Not with --goal.
        #[arg(long, conflicts_with = "goal")]
        no_eval: bool,
    },
    /// Hold inference sessions for the API: length-prefixed requests on stdin, replies on stdout.
    /// The API starts these itself (`[inference]` in the configuration).
    InferWorker {
        /// Requests run at once.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for TENANT (created if new). The key is printed once, on stdout; only its hash
    /// is stored. The tenant's webhook signing secret is printed on stderr.
    Create {
        #[arg(long)]
        tenant: String,
    },
    /// List keys: id, tenant, created, revoked (never the keys themselves).
    List,
    /// Revoke a key by its id; requests with it get 401 from then on.
    Revoke { id: uuid::Uuid },
    /// Print TENANT's webhook signing secret (created if it has none), e.g. for the "default"
    /// tenant of auth mode "none".
    WebhookSecret {
        #[arg(long)]
        tenant: String,
    },
}

fn main() -> ExitCode {
    telemetry::init();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("modelpress: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Compress {
            model,
            recipe,
            goal,
            out,
            job_id,
            events,
            dataset,
            task,
            label_key,
            provider,
            evaluation,
            no_eval,
        } => {
            let options = match evaluation {
                Some(json) => serde_json::from_str(&json).map_err(|e| format!("--evaluation: {e}")),
                None => serde_json::from_value::<Task>(serde_json::Value::String(task.clone()))
                    .map_err(|_| format!("--task {task:?}: expected classification, regression or generic"))
                    .map(|task| EvaluationOptions {
                        task,
                        label_key,
                        calibration_fraction: config.eval.calibration_fraction,
                        seed: config.eval.seed,
                        execution_provider: provider.unwrap_or_else(|| config.eval.execution_provider.clone()),
                        dim_overrides: Default::default(),
                        hold_out_calibration: false,
                    }),
            };
            match options {
                Ok(options) => compress(
                    &config,
                    &model,
                    match (&recipe, &goal) {
                        (Some(r), _) => Work::Recipe(r),
                        (None, g) => Work::Goal(g.as_deref().unwrap_or_default()),
                    },
                    &out,
                    job_id,
                    events,
                    no_eval,
                    &options,
                    dataset.as_deref(),
                ),
                Err(e) => {
                    eprintln!("modelpress compress: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::InferWorker { threads } => {
            let runtime = match Runtime::init(&config.onnxruntime.dylib_path) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("modelpress infer-worker: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let Err(e) = modelpress::infer::worker::serve(runtime, threads);
            eprintln!("modelpress infer-worker: {e}");
            ExitCode::FAILURE
        }
        command => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(run_async(config, command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = ?e, "modelpress failed");
                    eprintln!("modelpress: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run_async(mut config: Config, command: Command) -> anyhow::Result<()> {
    let (listen, workers) = match command {
        Command::Serve {
            listen,
            data_dir,
            no_worker,
            role,
        } => {
            if let Some(l) = listen {
                config.server.listen = l;
            }
            if let Some(d) = data_dir {
                config.server.data_dir = d;
            }
            let api = role != Role::Worker;
            let workers = role != Role::Api && !no_worker && (config.worker.enabled || role == Role::Worker);
            (api, workers)
        }
        Command::Worker { data_dir } => {
            if let Some(d) = data_dir {
                config.server.data_dir = d;
            }
            (false, true)
        }
        Command::Migrate => {
            let pool = db::connect(&config.database.url, 2)
                .await
                .context("connecting to PostgreSQL")?;
            db::migrate(&pool).await.context("running migrations")?;
            tracing::info!("migrations applied");
            return Ok(());
        }
        Command::Keys { action } => return keys(&config, action).await,
        Command::Compress { .. } | Command::InferWorker { .. } => unreachable!("handled without a runtime"),
    };
    let pool = db::connect(&config.database.url, config.database.max_connections)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact(&config.database.url)))?;
    if config.database.migrate_on_start {
        db::migrate(&pool).await.context("running migrations")?;
    }
    let listener = if listen {
        Some(
            tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("binding {}", config.server.listen))?,
        )
    } else {
        None
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    let options = ServiceOptions { listener, workers };
    service::run(Arc::new(config), pool, options, shutdown).await
}

async fn keys(config: &Config, action: KeysCommand) -> anyhow::Result<()> {
    let pool = db::connect(&config.database.url, 2)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact(&config.database.url)))?;
    if config.database.migrate_on_start {
        db::migrate(&pool).await.context("running migrations")?;
    }
    match action {
        KeysCommand::Create { tenant } => {
            let name = tenant.trim();
            anyhow::ensure!(
                !name.is_empty() && name.len() <= 255 && !name.chars().any(char::is_control),
                "--tenant must be 1 to 255 printable characters"
            );
            let issued = modelpress::api::auth::issue_key(&pool, name).await?;
            let secret =
                db::tenants::webhook_secret(&pool, issued.tenant, &modelpress::api::auth::random_secret()).await?;
            println!("{}", issued.key);
            eprintln!("key id {} for tenant {name:?} ({})", issued.id, issued.tenant);
            eprintln!("the key above is shown only now; store it, it cannot be recovered");
            eprintln!("webhook signing secret of this tenant: {secret}");
        }
        KeysCommand::List => {
            println!("{:<36}  {:<24}  {:<25}  revoked", "id", "tenant", "created");
            for k in db::tenants::list_keys(&pool).await? {
                let revoked = k.revoked_at.map_or("-".to_string(), |t| t.to_rfc3339());
                println!(
                    "{:<36}  {:<24}  {:<25}  {revoked}",
                    k.id,
                    k.tenant,
                    k.created_at.to_rfc3339()
                );
            }
        }
        KeysCommand::WebhookSecret { tenant } => {
            let id = db::tenants::get_or_create(&pool, tenant.trim()).await?;
            let secret = db::tenants::webhook_secret(&pool, id, &modelpress::api::auth::random_secret()).await?;
            println!("{secret}");
        }
        KeysCommand::Revoke { id } => {
            anyhow::ensure!(db::tenants::revoke_key(&pool, id).await?, "no active key has id {id}");
            eprintln!("key {id} revoked");
        }
    }
    Ok(())
}

/// SIGTERM or SIGINT: stop accepting, finish in-flight requests, stop claiming, let running jobs
/// finish within the grace period.
async fn signal_shutdown(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown signal received");
    token.cancel();
}

/// A connection string without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// What `compress` is asked to do: a recipe, or a goal for the advisor (JSON text or @FILE).
enum Work<'a> {
    Recipe(&'a str),
    Goal(&'a str),
}

#[allow(clippy::too_many_arguments)]
fn compress(
    config: &Config,
    model: &std::path::Path,
    work: Work<'_>,
    out: &std::path::Path,
    job_id: Option<uuid::Uuid>,
    events: bool,
    no_eval: bool,
    options: &EvaluationOptions,
    dataset: Option<&std::path::Path>,
) -> ExitCode {
    if events {
        // A bug in a pass must reach the job as an error with its message, not as a bare exit code;
        // a panic repeats on every attempt, so it is not retried.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            Event::Error {
                code: "internal".into(),
                message: format!("the job process panicked: {info}"),
                retryable: false,
            }
            .emit();
            default_hook(info);
        }));
    }
    let fail = |code: &str, message: String, retryable: bool| {
        if events {
            Event::Error {
                code: code.into(),
                message: message.clone(),
                retryable,
            }
            .emit();
        }
        eprintln!("modelpress compress: {code}: {message}");
        ExitCode::from(1)
    };
    let (text, what) = match work {
        Work::Recipe(t) => (t, "recipe"),
        Work::Goal(t) => (t, "goal"),
    };
    let text = match text.strip_prefix('@') {
        Some(file) => match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => return fail(&format!("invalid_{what}"), format!("reading {file}: {e}"), false),
        },
        None => text.to_string(),
    };
    let (recipe, goal) = if what == "goal" {
        match modelpress::advisor::parse_goal_arg(&text, options.task) {
            Ok(g) => (Recipe(Vec::new()), Some(g)),
            Err(e) => return fail("invalid_goal", e, false),
        }
    } else {
        match serde_json::from_str(&text)
            .map_err(|e| e.to_string())
            .and_then(|v| Recipe::parse(&v).map_err(|e| e.0))
        {
            Ok(r) => (r, None),
            Err(e) => return fail("invalid_recipe", e, false),
        }
    };
    // A measured run, or a recipe with a calibrating pass, needs ONNX Runtime: load it before any
    // work, so a missing library fails fast and no pass's timing includes mapping it. Other
    // transform-only runs never load it.
    let runtime = LazyRuntime::new(&config.onnxruntime.dylib_path);
    if (!no_eval || recipe.calibrates())
        && let Err(e) = runtime.get()
    {
        return fail("runtime_unavailable", e.to_string(), false);
    }
    let mut progress = |stage: &str, percent: f32| {
        if events {
            Event::Progress {
                stage: stage.into(),
                percent,
            }
            .emit();
        } else {
            tracing::info!(stage, percent, "progress");
        }
    };
    let input = PipelineInput {
        runtime: &runtime,
        model,
        recipe: &recipe,
        out_dir: out,
        eval: &config.eval,
        job_id,
        options,
        dataset,
    };
    let mut options = options.clone();
    if let Some(provider) = goal.as_ref().and_then(|g| g.execution_provider.clone()) {
        options.execution_provider = provider;
    }
    let input = PipelineInput {
        options: &options,
        ..input
    };
    if no_eval {
        return match pipeline::transform(input, &mut progress) {
            Ok(done) => {
                if events {
                    Event::Done.emit();
                } else {
                    for p in &done.passes {
                        println!("{}: {:.1} ms; {}", p.pass, p.duration_ms, p.notes.join("; "));
                    }
                    for w in &done.warnings {
                        println!("warning: {w}");
                    }
                    println!(
                        "wrote {} and {} (not evaluated)",
                        out.join(pipeline::MODEL_ARTIFACT).display(),
                        out.join(pipeline::PASSES_ARTIFACT).display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e.code(), e.to_string(), e.retryable()),
        };
    }
    let result = match &goal {
        Some(goal) => {
            let mut on_candidate = |c: &modelpress::advisor::CandidateRecord| {
                if events {
                    Event::Candidate {
                        candidate: serde_json::to_value(c).expect("candidates serialize"),
                    }
                    .emit();
                } else {
                    tracing::info!(id = c.id, label = %c.label, status = ?c.status, reasons = ?c.reasons, "candidate");
                }
            };
            modelpress::advisor::run(input, goal, &mut progress, &mut on_candidate)
        }
        None => pipeline::run(input, &mut progress),
    };
    match result {
        Ok(report) => {
            if events {
                Event::Done.emit();
            } else {
                let (o, r) = (&report.original, &report.result);
                println!(
                    "size {} -> {} bytes; p50 {:.3} -> {:.3} ms; max abs error {:.3e}, cosine {:.6}",
                    o.size_bytes,
                    r.size_bytes,
                    o.latency.p50_ms,
                    r.latency.p50_ms,
                    r.fidelity.max_abs_error,
                    r.fidelity.cosine_similarity
                );
                println!(
                    "wrote {} and {}",
                    out.join(pipeline::MODEL_ARTIFACT).display(),
                    out.join(pipeline::REPORT_ARTIFACT).display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e @ PipelineError::Io(_)) => fail(e.code(), e.to_string(), true),
        Err(e) => fail(e.code(), e.to_string(), e.retryable()),
    }
}
