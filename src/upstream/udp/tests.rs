//! The reused sockets against a real UDP server on loopback.

use super::*;
use std::net::SocketAddr;
use std::sync::Mutex as StdMutex;

/// A query for `<label>.` A IN with ID `id`, and its question.
fn query(id: u16, label: &str) -> (Vec<u8>, Vec<u8>) {
    let mut question = vec![label.len() as u8];
    question.extend_from_slice(label.as_bytes());
    question.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(&question);
    (q, question)
}

/// What the fake server saw: each query's source and ID.
type Seen = Arc<StdMutex<Vec<(SocketAddr, u16)>>>;

/// A UDP server on loopback that waits for `batch` queries, then answers them in reverse order,
/// each with `reply(query)` (none when it says `None`). Returns its address and what it saw.
async fn server(
    batch: usize,
    reply: impl Fn(&[u8]) -> Vec<Vec<u8>> + Send + 'static,
) -> (SocketAddr, Seen) {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        let mut held = Vec::new();
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            log.lock()
                .unwrap()
                .push((from, u16::from_be_bytes([buf[0], buf[1]])));
            held.push((buf[..n].to_vec(), from));
            if held.len() < batch {
                continue;
            }
            for (q, from) in held.drain(..).rev() {
                for d in reply(&q) {
                    let _ = s.send_to(&d, from).await;
                }
            }
        }
    });
    (addr, seen)
}

/// The query itself with QR set: a well-formed empty answer to it.
fn echo(q: &[u8]) -> Vec<u8> {
    let mut r = q.to_vec();
    r[2] |= 0x80;
    r
}

const LONG: Duration = Duration::from_secs(60);

async fn ask(addr: SocketAddr, expire: Duration, id: u16, label: &str) -> Delivery {
    let (q, question) = query(id, label);
    tokio::time::timeout(
        Duration::from_secs(10),
        exchange(addr, expire, &q, &question),
    )
    .await
    .expect("an answer or an error, not a hang")
}

#[tokio::test]
async fn queries_in_flight_share_one_socket_and_each_gets_its_own_reply() {
    let (addr, seen) = server(8, |q| vec![echo(q)]).await;
    let asks = (0..8u16).map(|i| async move {
        let label = format!("n{i}");
        let r = ask(addr, LONG, 100 + i, &label).await.expect("a reply");
        let (_, question) = query(0, &label);
        assert!(matches(&r, 100 + i, &question), "its own reply, its own ID");
    });
    futures_util::future::join_all(asks).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 8);
    assert!(
        seen.iter().all(|(from, _)| *from == seen[0].0),
        "one source for all: {seen:?}"
    );
}

#[tokio::test]
async fn a_clashing_id_is_changed_on_the_wire_and_restored() {
    let (addr, seen) = server(2, |q| vec![echo(q)]).await;
    let (a, b) = tokio::join!(ask(addr, LONG, 7, "a"), ask(addr, LONG, 7, "b"));
    let (a, b) = (a.expect("a"), b.expect("b"));
    assert!(matches(&a, 7, &query(7, "a").1));
    assert!(matches(&b, 7, &query(7, "b").1));
    let seen = seen.lock().unwrap();
    assert_ne!(seen[0].1, seen[1].1, "two IDs on one socket: {seen:?}");
}

#[tokio::test]
async fn a_reply_to_another_question_is_ignored_and_the_real_one_taken() {
    // Under the query's ID: first a well-formed reply to another question (a forgery), then the
    // real reply.
    let (addr, _) = server(1, |q| {
        let mut forged = echo(&query(0, "evil").0);
        forged[0..2].copy_from_slice(&q[0..2]);
        vec![forged, echo(q)]
    })
    .await;
    let r = ask(addr, LONG, 9, "real").await.expect("the real reply");
    assert!(matches(&r, 9, &query(9, "real").1));
}

#[tokio::test]
async fn garbage_under_the_query_id_fails_the_attempt() {
    let (addr, _) = server(1, |q| vec![q[0..2].to_vec()]).await;
    assert_eq!(
        ask(addr, LONG, 3, "short").await,
        Err(AttemptError::Malformed),
        "two bytes: the ID and nothing else"
    );
    let (addr, _) = server(1, |q| vec![q.to_vec()]).await;
    assert_eq!(
        ask(addr, LONG, 4, "qr").await,
        Err(AttemptError::Malformed),
        "QR clear: not a response"
    );
}

#[tokio::test]
async fn a_spent_socket_is_replaced_by_one_on_another_port() {
    let (addr, seen) = server(1, |q| vec![echo(q)]).await;
    for i in 0..3 {
        ask(addr, Duration::ZERO, i, "x").await.expect("a reply");
    }
    let (fresh, _) = server(1, |q| vec![echo(q)]).await;
    for i in 0..3 {
        ask(fresh, LONG, i, "x").await.expect("a reply");
    }
    let spent = seen.lock().unwrap();
    assert!(
        spent[0].0 != spent[1].0 && spent[1].0 != spent[2].0,
        "spent at once: a socket per query {spent:?}"
    );
}

#[tokio::test]
async fn a_closed_port_is_refused() {
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    assert_eq!(
        ask(addr, LONG, 1, "x").await,
        Err(AttemptError::Refused),
        "the ICMP error fails the query at once"
    );
}

#[test]
fn a_socket_does_not_outlive_its_runtime() {
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = rt();
    let addr = first.block_on(async {
        let (addr, _) = server(1, |q| vec![echo(q)]).await;
        ask(addr, LONG, 1, "x").await.expect("a reply");
        addr
    });
    // The server lived on the first runtime: this one's query must fail (or be refused), not
    // wait on the first runtime's dead reader.
    drop(first);
    let second = rt();
    let r = second.block_on(ask(addr, LONG, 2, "x"));
    assert!(r.is_err(), "{r:?}");
    second.block_on(async {
        let (addr, _) = server(1, |q| vec![echo(q)]).await;
        ask(addr, LONG, 3, "x")
            .await
            .expect("a new server, a new socket");
    });
}
