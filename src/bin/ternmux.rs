//! The `ternmux` command-line tool.
//!
//! Errors print once, behind a `ternmux: ` prefix, with a hint after a blank line where one
//! helps; the exit code is 2 on error and 0 on success. A closed pipe (`ternmux inspect f | head`)
//! ends the program quietly with exit code 0.

use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use ternmux::gguf::{GgufFile, Report};
use ternmux::kernels::ternary::TernaryFormat;

#[derive(Parser)]
#[command(
    name = "ternmux",
    version,
    about = "Run 1.58-bit ternary language models fast on CPUs and GPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a GGUF file's architecture, metadata, tensor table and totals per type.
    Inspect {
        /// The GGUF file.
        file: PathBuf,
    },
    /// Rewrite the ternary tensors of a GGUF file in another ternary format (others are copied).
    Convert {
        /// Input GGUF file.
        input: PathBuf,
        /// Output GGUF file.
        output: PathBuf,
        /// Target ternary format.
        #[arg(long, value_enum)]
        to: Target,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    #[value(name = "tq2_0")]
    Tq2_0,
    #[value(name = "tq1_0")]
    Tq1_0,
    #[value(name = "i2_s")]
    I2S,
}

impl From<Target> for TernaryFormat {
    fn from(t: Target) -> TernaryFormat {
        match t {
            Target::Tq2_0 => TernaryFormat::Tq2_0,
            Target::Tq1_0 => TernaryFormat::Tq1_0,
            Target::I2S => TernaryFormat::I2S,
        }
    }
}

/// A failure with an optional hint for the person at the terminal.
struct Failure {
    error: ternmux::Error,
    hint: Option<&'static str>,
}

impl From<ternmux::Error> for Failure {
    fn from(error: ternmux::Error) -> Self {
        let hint = match &error {
            ternmux::Error::Io { .. } => Some("check the path and its permissions"),
            ternmux::Error::Gguf(m) if m.contains("bad magic") => Some(
                "the file is not a GGUF model; convert it with llama.cpp's or bitnet.cpp's converter",
            ),
            ternmux::Error::Quant(m) if m.contains("i2_s") => Some(
                "i2_s stores one scale per tensor; convert to tq2_0 or tq1_0 instead, which keep per-block scales",
            ),
            _ => None,
        };
        Failure { error, hint }
    }
}

fn run(cli: Cli, out: &mut impl Write) -> Result<(), Failure> {
    match cli.command {
        Command::Inspect { file } => {
            let g = GgufFile::open(&file)?;
            write!(out, "{}", Report::new(&g, file.display().to_string())).map_err(io_failure)?;
        }
        Command::Convert { input, output, to } => {
            let to = TernaryFormat::from(to);
            let start = std::time::Instant::now();
            let r = ternmux::convert::convert_file(&input, &output, to)?;
            writeln!(
                out,
                "converted {} ternary tensors to {}, copied {} tensors unchanged; wrote {} bytes to {} in {:.2?}",
                r.converted,
                to.name(),
                r.copied,
                r.bytes_written,
                output.display(),
                start.elapsed()
            )
            .map_err(io_failure)?;
        }
    }
    Ok(())
}

fn io_failure(e: std::io::Error) -> Failure {
    Failure {
        error: ternmux::Error::Io {
            path: "<stdout>".into(),
            source: e,
        },
        hint: None,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = run(cli, &mut out).and_then(|()| out.flush().map_err(io_failure));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure {
            error: ternmux::Error::Io { source, .. },
            ..
        }) if source.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("ternmux: {}", f.error);
            let mut src = std::error::Error::source(&f.error);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            if let Some(h) = f.hint {
                eprintln!("\nhint: {h}");
            }
            ExitCode::from(2)
        }
    }
}
