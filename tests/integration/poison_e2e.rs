//! Anti-poisoning (RFC 5452): forged replies flood nodedns's upstream port while the real reply is
//! pending; none is served or cached.

use std::net::Ipv4Addr;

use hickory_proto::rr::RecordType;

use crate::fake_upstream::{Behavior, FORGED_IP, FakeUpstream};
use crate::harness::{Nodedns, a_addrs, query_udp_retry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replies_are_never_served_or_cached() {
    let up = FakeUpstream::start().await;
    let node = Nodedns::with_upstream(&up, &[]).await;
    for i in 0..5u8 {
        let name = format!("target-{i}.example");
        let real = Ipv4Addr::new(10, 1, 1, i + 1);
        up.set_a(&name, real, 300);
        // 34 forgeries from the upstream's own address (wrong ID ×32, wrong name, other qtype) and 8
        // from another port with the right ID and question, all before the real reply.
        up.set_behavior(&name, Behavior::Forge);
        let r = query_udp_retry(node.addr, &format!("{name}."), RecordType::A).await;
        assert_eq!(
            a_addrs(&r),
            vec![real],
            "{name}: the real answer, not {FORGED_IP}"
        );
        // And what was cached is the real answer too.
        let again = query_udp_retry(node.addr, &format!("{name}."), RecordType::A).await;
        assert_eq!(a_addrs(&again), vec![real]);
        assert_eq!(
            up.queries(&name),
            1,
            "{name}: answered from cache the second time"
        );
    }
}
