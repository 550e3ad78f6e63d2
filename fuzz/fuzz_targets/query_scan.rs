//! The hit path's own query scanner against hickory-proto as the oracle: whatever both accept, they
//! read as the same (lowercased) name, type and class. (The scanner skips a query's answer and
//! authority records structurally without decoding their names, so it accepts some messages hickory
//! rejects for a bad record there; only the question and OPT matter to an answer.)
#![no_main]

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use nodedns::wire::scan_query;

fuzz_target!(|data: &[u8]| {
    let Ok(view) = scan_query(data) else { return };
    let Ok(m) = Message::from_vec(data) else {
        return;
    };
    let q = m.queries.first().expect("one question");
    assert_eq!(u16::from(q.query_type()), view.key.qtype);
    assert_eq!(u16::from(q.query_class()), view.key.qclass);
    // Label bytes, not presentation text: hickory's `to_ascii` escapes non-ASCII bytes in octal
    // where RFC 1035 (and nodedns's log) use decimal.
    let mut theirs = Vec::new();
    for label in q.name().iter() {
        theirs.push(label.len() as u8);
        theirs.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    theirs.push(0);
    assert_eq!(view.key.name(), &theirs[..], "name");
});
