//! The `membrane-cni` binary: read the invocation, run it, print the answer.
#![forbid(unsafe_code)]

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use membrane_cni::agent::UdsAgent;
use membrane_cni::plugin::{self, Failure};
use membrane_cni::result::{CniError, ErrorCode, SPEC_VERSION};

fn main() -> ExitCode {
    // Belt and braces: should anything panic, the runtime still gets a spec
    // error object rather than a Rust backtrace.
    std::panic::set_hook(Box::new(|info| {
        let failure = fail(CniError::new(
            ErrorCode::Agent,
            "membrane-cni panicked",
            info.to_string(),
        ));
        println!("{}", failure.to_json());
        std::process::exit(1);
    }));

    let lookup = |key: &str| std::env::var(key).ok();
    let outcome = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(plugin::run(
            &lookup,
            || {
                let mut input = Vec::new();
                std::io::stdin().read_to_end(&mut input).map(|_| input)
            },
            UdsAgent::new,
        )),
        Err(e) => Err(fail(CniError::new(
            ErrorCode::IoFailure,
            "cannot start the async runtime",
            e.to_string(),
        ))),
    };

    let (text, code) = match outcome {
        Ok(Some(json)) => (Some(json), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(failure) => (Some(failure.to_json()), ExitCode::FAILURE),
    };
    if let Some(text) = text {
        let mut stdout = std::io::stdout().lock();
        // Nothing useful is left to do if stdout is gone.
        let _ = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
    }
    code
}

fn fail(error: CniError) -> Failure {
    Failure {
        version: SPEC_VERSION,
        error,
    }
}
