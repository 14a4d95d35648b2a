//! What the `apply_request` fuzz target (fuzz/) holds the Agent API's edge to, here so a
//! stable test replays its committed corpus in every CI run.
use crate::server::apply_spec;
use crate::spec::{DEFAULT_MAX_DURATION, FaultSpec};
use chaos_proto::agent::v1 as pb;
use prost::Message;

/// The longest refusal line the targets accept: [`crate::spec::ERROR_LINE_MAX`] and the
/// field.
pub const MAX_ERROR_LINE: usize = 512;

/// Any bytes, as the body of an Apply request: decoded as the server's codec decodes it, then
/// parsed with the CLI's parsers and validated as the engine validates. A refusal is one
/// bounded line (INVALID_ARGUMENT at the edge); a valid spec, sent back as protobuf, parses
/// to the same spec.
pub fn apply(data: &[u8]) {
    let Ok(req) = pb::ApplyRequest::decode(data) else {
        return;
    };
    match apply_spec(req) {
        Ok((_, spec)) => match spec.validate(DEFAULT_MAX_DURATION) {
            // What an engine would apply (never NaN: the validation refuses it).
            Ok(()) => {
                let again = FaultSpec::try_from(pb::FaultSpec::from(&spec));
                assert_eq!(again.as_ref(), Ok(&spec), "the spec, sent back, changed");
            }
            Err(e) => one_bounded_line(&e.to_string()),
        },
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            one_bounded_line(status.message());
        }
    }
}

/// Holds a refusal to one line of at most [`MAX_ERROR_LINE`] bytes.
pub fn one_bounded_line(line: &str) {
    assert!(!line.contains('\n'), "a refusal on several lines: {line:?}");
    assert!(
        line.len() <= MAX_ERROR_LINE,
        "a refusal of {} bytes: {:?}...",
        line.len(),
        &line[..line.floor_char_boundary(300)]
    );
}

/// Runs `check` on every input of a committed corpus (`fuzz/corpus/NAME`), as the stable
/// tests of each target do; a corpus of fewer than 10 inputs is a mistake.
pub fn replay(corpus: &str, check: fn(&[u8])) {
    let dir = format!("{}/../fuzz/corpus/{corpus}", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("the committed corpus") {
        let path = entry.expect("a corpus entry").path();
        check(&std::fs::read(&path).expect("a corpus file"));
        n += 1;
    }
    assert!(n >= 10, "{n} inputs in {dir}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fuzz_corpus_replays() {
        super::replay("apply_request", super::apply);
    }
}
