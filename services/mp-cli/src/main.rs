//! `mp`: the Machine Punishment command line. Thin: parse → set up → call the library.

mod bench_efficacy;
mod bench_experts;
mod bench_ordering;
mod bench_platform;
mod bench_proposals;
mod bench_queue;
mod bench_scale;
mod bench_speed;
mod bench_views;
mod commands;
mod common;
mod init;
mod marks_io;
mod nodes;
mod platform;
mod plot;
mod project;
mod report;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mp",
    version,
    about = "Machine Punishment: correct why an image classifier decides"
)]
struct Cli {
    /// libtorch intra-op threads (0 = libtorch's default)
    #[arg(long, global = true, env = "MP_THREADS", default_value_t = 0)]
    threads: i32,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ExportCmd {
    /// A model version as TorchScript module (imported modules) + safetensors state_dict
    Model(project::ExportArgs),
    /// Every mark: mark PNGs per expert (folder), COCO-style RLE JSON, or JSONL
    Marks(marks_io::MarksExportArgs),
}

#[derive(Subcommand)]
enum ImportCmd {
    /// Marks in the formats `mp export marks` writes; deduplicated by image and expert
    Marks(marks_io::MarksImportArgs),
}

#[derive(Subcommand)]
enum Command {
    /// Build datasets
    #[command(subcommand)]
    Data(commands::DataCmd),
    /// Train a model (plain cross-entropy or guided by marks)
    Train(commands::TrainArgs),
    /// Evaluate a model on a split
    Eval(commands::EvalArgs),
    /// Write a saliency map of one image as PNG
    Saliency(commands::SaliencyArgs),
    /// Refine a model on one image and its mark; write before/after PNG and figures
    Refine(commands::RefineArgs),
    /// Learn suggested marks from K marked images and check them on the others
    Suggest(commands::SuggestArgs),
    /// Benchmarks that write into BENCHMARKS.md
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Serve the gRPC gateway (config file, MP_* env, flags)
    Gateway(platform::GatewayArgs),
    /// Projects in Redis
    #[command(subcommand)]
    Project(platform::ProjectCmd),
    /// Simulated experts that use the public API like a person
    ExpertSim(platform::SimArgs),
    /// Administration through the API
    #[command(subcommand)]
    Admin(platform::AdminCmd),
    /// Reports through the API (admins)
    #[command(subcommand)]
    Report(platform::ReportCmd),
    /// Run the saliency / refinement worker pool
    Worker(nodes::WorkerArgs),
    /// Run the trainer (rounds, commits, guided training, checkpoints)
    Trainer(nodes::TrainerArgs),
    /// One machine: redis-server, gateway, trainer and workers on the demo project
    Up(nodes::UpArgs),
    /// Take a model version back to PyTorch, or the marks out to other tools
    #[command(subcommand)]
    Export(ExportCmd),
    /// Bring marks made elsewhere (or exported from another project) in
    #[command(subcommand)]
    Import(ImportCmd),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Decoy-test accuracy against the number of marked images, per loss, with and without propagation
    Efficacy(bench_efficacy::EfficacyArgs),
    /// This engine against a PyTorch reference script, timed in the same run
    Speed(bench_speed::SpeedArgs),
    /// Lease -> submit round trip and leases per second with concurrent simulated experts
    Queue(bench_queue::QueueArgs),
    /// The whole loop (Decoy-MNIST or --data): accuracy vs committed marks per queue ordering,
    /// expert effort, worker throughput
    Platform(bench_platform::PlatformArgs),
    /// Simulated experts who disagree: accuracy after a round with careful experts, with a
    /// third sloppy or adversarial, and with those at overlap N plus a reviewer
    Experts(bench_experts::ExpertsArgs),
    /// A project of 10k / 100k synthetic images: ingest, Redis bytes per image, a full
    /// scoring pass with 1 and 2 workers, lease -> submit latency against queue size
    Scale(bench_scale::ScaleArgs),
    /// GetImage latency with many experts at once on a real model size: views stored by the
    /// scoring pass, computed by the workers in batches, or by the gateway alone
    Views(bench_views::ViewsArgs),
    /// Refinement proposals per marked image: iterations, attention moved, earlier vs current defaults
    Proposals(bench_proposals::ProposalsArgs),
    /// Mark-free queue signals on a set with the shortcut in some images: are the shortcut
    /// images reviewed first?
    Ordering(bench_ordering::OrderingArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,mp_gateway=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if cli.threads > 0 {
        tch::set_num_threads(cli.threads);
    }
    let result = match cli.command {
        Command::Data(c) => commands::data(c),
        Command::Train(a) => commands::train(a),
        Command::Eval(a) => commands::eval(a),
        Command::Saliency(a) => commands::saliency(a),
        Command::Refine(a) => commands::refine(a),
        Command::Suggest(a) => commands::suggest(a),
        Command::Bench(BenchCmd::Efficacy(a)) => bench_efficacy::run(a),
        Command::Bench(BenchCmd::Speed(a)) => bench_speed::run(a),
        Command::Bench(BenchCmd::Queue(a)) => bench_queue::run(a),
        Command::Bench(BenchCmd::Platform(a)) => bench_platform::run(a),
        Command::Bench(BenchCmd::Experts(a)) => bench_experts::run(a),
        Command::Bench(BenchCmd::Proposals(a)) => bench_proposals::run(a),
        Command::Bench(BenchCmd::Ordering(a)) => bench_ordering::run(a),
        Command::Bench(BenchCmd::Scale(a)) => bench_scale::run(a),
        Command::Bench(BenchCmd::Views(a)) => bench_views::run(a),
        Command::Gateway(a) => platform::gateway(a),
        Command::Project(platform::ProjectCmd::Init(a)) => init::init_command(*a),
        Command::Project(platform::ProjectCmd::Overlap { n, place }) => {
            init::overlap_command(n, &place)
        }
        Command::Project(platform::ProjectCmd::ReviewBelow { kappa, place }) => {
            init::review_below_command(kappa, &place)
        }
        Command::Worker(a) => nodes::worker(a),
        Command::Trainer(a) => nodes::trainer(a),
        Command::Up(a) => nodes::up(a),
        Command::Export(ExportCmd::Model(a)) => project::export(a).map(|_| ()),
        Command::Export(ExportCmd::Marks(a)) => marks_io::export_marks(a).map(|_| ()),
        Command::Import(ImportCmd::Marks(a)) => marks_io::import_marks(a).map(|_| ()),
        Command::ExpertSim(a) => platform::expert_sim(a),
        Command::Admin(c) => platform::admin(c),
        Command::Report(c) => platform::report(c),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
