//! `chaosctl certs init|issue`: the PKI of a small standalone fleet (see certs.rs).
use crate::EXIT_INVALID;
use anyhow::Result;
use chaos_controller::certs::{self, CertError};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a CA, the controller's server certificate and client certificates.
    Init {
        /// The old name of --tls-dir, the directory to write into (it must not hold a CA yet;
        /// default chaos-tls).
        #[arg(long, hide = true)]
        dir: Option<PathBuf>,
        /// Host names or IP addresses the controller is reached at (localhost, 127.0.0.1 and ::1
        /// are always included). Repeatable.
        #[arg(long = "controller-name")]
        controller_names: Vec<String>,
        /// The node name of an agent to issue a certificate for. Repeatable.
        #[arg(long = "node")]
        agents: Vec<String>,
        /// A person (or CI job) using chaosctl. Repeatable.
        #[arg(long = "user")]
        users: Vec<String>,
    },
    /// Issue one more agent or user certificate with an existing CA.
    Issue {
        /// The old name of --tls-dir.
        #[arg(long, hide = true)]
        dir: Option<PathBuf>,
        /// An agent's node name.
        #[arg(
            long = "node",
            conflicts_with = "user",
            required_unless_present = "user"
        )]
        agent: Option<String>,
        #[arg(long)]
        user: Option<String>,
    },
}

/// `tls_dir` is the global --tls-dir: the directory these commands write is the one the others
/// read, under the same name.
pub fn run(cmd: CertsCommand, tls_dir: Option<PathBuf>) -> Result<ExitCode> {
    let pick = |dir: Option<PathBuf>| {
        dir.or(tls_dir.clone())
            .unwrap_or_else(|| PathBuf::from("chaos-tls"))
    };
    let written = match cmd {
        CertsCommand::Init {
            dir,
            controller_names,
            agents,
            users,
        } => certs::init(&pick(dir), &controller_names, &agents, &users),
        CertsCommand::Issue { dir, agent, user } => match (agent, user) {
            (Some(a), _) => certs::issue(&pick(dir), certs::ROLE_AGENT, &a),
            (_, Some(u)) => certs::issue(&pick(dir), certs::ROLE_USER, &u),
            (None, None) => Err(CertError::Invalid("--node or --user is required".into())),
        },
    };
    match written {
        Ok(w) => {
            for f in w.files {
                println!("wrote {}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(CertError::Invalid(line)) => {
            crate::output::error(line, EXIT_INVALID);
            Ok(ExitCode::from(EXIT_INVALID))
        }
        Err(e) => Err(e.into()),
    }
}
