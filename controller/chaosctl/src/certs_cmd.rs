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
        /// Directory to write into; must not hold a CA yet.
        #[arg(long, default_value = "chaos-tls")]
        dir: PathBuf,
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
        #[arg(long, default_value = "chaos-tls")]
        dir: PathBuf,
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

pub fn run(cmd: CertsCommand) -> Result<ExitCode> {
    let written = match cmd {
        CertsCommand::Init {
            dir,
            controller_names,
            agents,
            users,
        } => certs::init(&dir, &controller_names, &agents, &users),
        CertsCommand::Issue { dir, agent, user } => match (agent, user) {
            (Some(a), _) => certs::issue(&dir, certs::ROLE_AGENT, &a),
            (_, Some(u)) => certs::issue(&dir, certs::ROLE_USER, &u),
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
            eprintln!("chaosctl: {line}");
            Ok(ExitCode::from(EXIT_INVALID))
        }
        Err(e) => Err(e.into()),
    }
}
