use clap::Parser;
use transfer_ledger::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    // glibc gives every thread that allocates an arena of its own; with a
    // connection thread per SQLite connection that fragments the heap and
    // inflates the resident set. Two arenas are plenty for two cores.
    // Large buffers (request bodies of a batch, export chunks) are mapped
    // and unmapped on their own instead of staying in the heap afterwards.
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run())
}

async fn run() -> std::process::ExitCode {
    // Freed memory inside the heap (the parsed bodies of batch requests) is
    // handed back to the system every few seconds, not only at its top.
    tokio::spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            // SAFETY: malloc_trim only releases free pages.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    });
    let cli = Cli::parse();
    // Commands other than the service and the bench print their own
    // results: only warnings and errors are logged beside them.
    let quiet = !matches!(cli.command, cli::Command::Serve | cli::Command::Bench(_));
    if let Err(e) = transfer_ledger::telemetry::init(quiet) {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
