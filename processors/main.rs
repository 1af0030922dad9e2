use clap::Parser;

// glibc's allocator took 45 % of the processors' CPU with a million customers (most of it in
// _int_malloc and malloc_consolidate) and fragmented the heap; mimalloc is made for many small,
// short-lived allocations across threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = herald::cli::Cli::parse();
    match herald::cli::main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
