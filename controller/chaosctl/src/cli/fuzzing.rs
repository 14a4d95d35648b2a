//! What the `cli_args` fuzz target (fuzz/) holds chaosctl's parser to, here so a stable test
//! replays its committed corpus in every CI run.
use super::{Cli, Command};
use chaos_agent::fuzzing::one_bounded_line;
use chaos_agent::spec::DEFAULT_MAX_DURATION;
use clap::Parser;

/// Any text, one argument per line, after `chaosctl`: clap parses it; an inject is turned
/// into the fault spec a node applies and the experiment a cluster runs, as `dispatch` would,
/// and each refusal is one bounded line.
pub fn args(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let argv = std::iter::once("chaosctl").chain(text.split('\n'));
    let Ok(cli) = Cli::try_parse_from(argv) else {
        return;
    };
    let Command::Inject { fault } = cli.command else {
        return;
    };
    match fault.spec() {
        Ok((spec, _)) => {
            if let Err(e) = spec.validate(DEFAULT_MAX_DURATION) {
                one_bounded_line(&e.to_string());
            }
        }
        Err(e) => one_bounded_line(&e.to_string()),
    }
    match fault.model_fault() {
        Ok((f, run)) => {
            if let Err(e) = super::inject_experiment(f, run) {
                one_bounded_line(&e);
            }
        }
        Err(e) => one_bounded_line(&e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fuzz_corpus_replays() {
        chaos_agent::fuzzing::replay("cli_args", super::args);
    }

    /// The seeds of the `apply_request` corpus: each inject of this corpus that parses, as
    /// the Apply request chaosctl would send. `cargo test -p chaosctl -- --ignored seeds`.
    #[test]
    #[ignore = "writes fuzz/corpus/apply_request"]
    fn seeds_of_the_apply_request_corpus() {
        use chaos_proto::agent::v1 as pb;
        use clap::Parser;
        use prost::Message;
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus");
        let mut n = 0;
        for entry in std::fs::read_dir(format!("{root}/cli_args")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let argv = std::iter::once("chaosctl").chain(text.split('\n'));
            let Ok(cli) = super::Cli::try_parse_from(argv) else {
                continue;
            };
            let super::Command::Inject { fault } = cli.command else {
                continue;
            };
            let Ok((spec, _)) = fault.spec() else {
                continue;
            };
            let req = pb::ApplyRequest {
                spec: Some(pb::FaultSpec::from(&spec)),
            };
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            std::fs::write(format!("{root}/apply_request/{name}"), req.encode_to_vec()).unwrap();
            n += 1;
        }
        assert!(n >= 10, "{n} seeds");
    }
}
