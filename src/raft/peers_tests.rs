//! Tests of the peer client (`raft::peers`): how a failed call maps to
//! openraft's kinds, and the stream of appends over a real socket.
use super::*;

#[test]
fn a_failed_call_is_unreachable_only_where_openraft_should_back_off() {
    use tonic::{Code, Status};
    let rpc = |code| PeerError::Rpc {
        id: 2,
        status: Status::new(code, "x"),
    };
    let timeout = PeerError::Timeout {
        id: 2,
        after: Duration::from_millis(50),
    };
    let bad = PeerError::BadAddress {
        id: 2,
        why: "x".into(),
    };
    // (failure, unreachable?)
    let table = [
        (rpc(Code::Unavailable), true),
        (PeerError::UnknownPeer(2), true),
        (bad, true),
        (rpc(Code::PermissionDenied), false),
        (rpc(Code::InvalidArgument), false),
        (rpc(Code::Cancelled), false),
        (rpc(Code::DeadlineExceeded), false),
        (timeout, false),
    ];
    for (e, want) in table {
        let what = e.to_string();
        let got = matches!(failed(e), RPCError::Unreachable(_));
        assert_eq!(got, want, "{what}");
    }
}

/// A peer's Raft service that answers each append with the append
/// itself, `promise_ms` milliseconds late, and counts the streams and
/// single calls it took; with `streams` false, an older keyraft.
#[derive(Clone, Default)]
struct Echo {
    streams: bool,
    opened: Arc<AtomicU64>,
    singles: Arc<AtomicU64>,
}

async fn echo(p: pb::RaftPayload) -> Result<pb::RaftPayload, tonic::Status> {
    tokio::time::sleep(Duration::from_millis(p.promise_ms.into())).await;
    Ok(p)
}

type Echoes =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RaftPayload, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::raft_server::Raft for Echo {
    async fn append_entries(
        &self,
        req: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        self.singles.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(echo(req.into_inner()).await?))
    }
    type AppendsStream = Echoes;
    async fn appends(
        &self,
        req: tonic::Request<tonic::Streaming<pb::RaftPayload>>,
    ) -> Result<tonic::Response<Echoes>, tonic::Status> {
        use futures::StreamExt;
        if !self.streams {
            return Err(tonic::Status::unimplemented("no Appends here"));
        }
        self.opened.fetch_add(1, Ordering::SeqCst);
        let answers = req.into_inner().then(|p| async move { echo(p?).await });
        Ok(tonic::Response::new(Box::pin(answers)))
    }
    async fn vote(
        &self,
        _: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        Err(tonic::Status::unimplemented("not asked"))
    }
    async fn pre_vote(
        &self,
        _: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        Err(tonic::Status::unimplemented("not asked"))
    }
    async fn install_snapshot(
        &self,
        _: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        Err(tonic::Status::unimplemented("not asked"))
    }
    async fn transfer_leader(
        &self,
        _: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        Err(tonic::Status::unimplemented("not asked"))
    }
}

/// Node 1's peers, with node 2 served by `echo` on a real socket.
async fn echoed(echo: Echo) -> Arc<Peers> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::raft_server::RaftServer::new(echo))
            .serve_with_incoming(incoming),
    );
    Peers::new(1, None, BTreeMap::from([(2, addr)]))
}

fn sent(n: u8, late_ms: u32) -> pb::RaftPayload {
    pb::RaftPayload {
        json: vec![n],
        leader_durable: 0,
        promise_ms: late_ms,
    }
}

#[tokio::test]
async fn appends_share_one_stream_and_an_answer_is_always_to_the_append_just_sent() {
    let peer = Echo {
        streams: true,
        ..Echo::default()
    };
    let peers = echoed(peer.clone()).await;
    let lane = Lane::default();
    let ttl = Duration::from_secs(5);
    for n in 1..=100 {
        let reply = peers
            .streamed_append(&lane, 2, sent(n, 0), ttl)
            .await
            .unwrap();
        assert_eq!(reply.json, vec![n]);
    }
    assert_eq!(
        peer.opened.load(Ordering::SeqCst),
        1,
        "one stream for a hundred"
    );
    // An answer later than the deadline: the append fails, and its
    // answer, when it comes, is not taken for the next append's.
    let late = peers
        .streamed_append(&lane, 2, sent(4, 300), Duration::from_millis(100))
        .await;
    assert!(late.is_err(), "{late:?}");
    let reply = peers
        .streamed_append(&lane, 2, sent(5, 0), ttl)
        .await
        .unwrap();
    assert_eq!(
        reply.json,
        vec![5],
        "the late answer was taken for this one"
    );
    assert_eq!(peer.opened.load(Ordering::SeqCst), 2, "a new stream after");
    assert_eq!(peer.singles.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_stream_on_a_replaced_channel_is_not_used_again() {
    let (a, b) = (
        Echo {
            streams: true,
            ..Echo::default()
        },
        Echo {
            streams: true,
            ..Echo::default()
        },
    );
    let peers = echoed(a.clone()).await;
    let moved = echoed(b.clone()).await;
    let lane = Lane::default();
    let ttl = Duration::from_secs(5);
    peers
        .streamed_append(&lane, 2, sent(1, 0), ttl)
        .await
        .unwrap();
    // Node 2 moved (its address, as a membership change teaches it).
    peers.set_addr(2, &moved.addr(2).unwrap());
    peers
        .streamed_append(&lane, 2, sent(2, 0), ttl)
        .await
        .unwrap();
    assert_eq!(a.opened.load(Ordering::SeqCst), 1);
    assert_eq!(
        b.opened.load(Ordering::SeqCst),
        1,
        "the append went to the old address"
    );
}

#[tokio::test]
async fn a_peer_with_no_streams_gets_single_calls() {
    let peer = Echo::default();
    let peers = echoed(peer.clone()).await;
    let lane = Lane::default();
    for n in 1..=2 {
        let reply = peers
            .streamed_append(&lane, 2, sent(n, 0), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(reply.json, vec![n]);
    }
    assert_eq!(peer.singles.load(Ordering::SeqCst), 2);
    assert!(matches!(*lock(&lane.0), Pipe::Single));
}

#[test]
fn an_answer_carries_the_peers_reply_or_openraft_s_error() {
    let ok = serde_json::to_vec(&Ok::<_, openraft::errors::RaftError<TypeConfig>>(
        AppendEntriesResponse::<TypeConfig>::Success,
    ))
    .unwrap();
    let got: AppendEntriesResponse<TypeConfig> = answer(2, &ok).unwrap();
    assert_eq!(got, AppendEntriesResponse::Success);
    let fatal = serde_json::to_vec(&Err::<AppendEntriesResponse<TypeConfig>, _>(
        openraft::errors::RaftError::<TypeConfig>::Fatal(openraft::errors::Fatal::Stopped),
    ))
    .unwrap();
    let r: Result<AppendEntriesResponse<TypeConfig>, _> = answer(2, &fatal);
    assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");
    let r: Result<AppendEntriesResponse<TypeConfig>, _> = answer(2, b"not json");
    assert!(matches!(r, Err(RPCError::Network(_))), "{r:?}");
}

/// A TCP proxy to `to`, and what cuts every connection it carries.
async fn cuttable(to: String) -> (String, Arc<tokio::sync::Notify>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cut = Arc::new(tokio::sync::Notify::new());
    let cuts = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut near, _)) = listener.accept().await {
            let Ok(mut far) = tokio::net::TcpStream::connect(&to).await else {
                continue;
            };
            let cuts = cuts.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut near, &mut far) => {}
                    _ = cuts.notified() => {}
                }
            });
        }
    });
    (addr, cut)
}

#[tokio::test]
async fn a_stream_whose_connection_died_gives_way_to_a_new_one_for_the_next_append() {
    let peer = Echo {
        streams: true,
        ..Echo::default()
    };
    let direct = echoed(peer.clone()).await;
    let (proxy, cut) = cuttable(direct.addr(2).unwrap()).await;
    let peers = Peers::new(1, None, BTreeMap::from([(2, proxy)]));
    let lane = Lane::default();
    let ttl = Duration::from_secs(5);
    peers
        .streamed_append(&lane, 2, sent(1, 0), ttl)
        .await
        .unwrap();
    // The peer restarts, or the link is reset: its connection is gone.
    cut.notify_waiters();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !matches!(&*lock(&lane.0), Pipe::Open(p) if p.tx.is_closed()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream never saw its connection go"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = peers.streamed_append(&lane, 2, sent(2, 0), ttl).await;
    assert_eq!(
        reply.unwrap().json,
        vec![2],
        "the first append after failed"
    );
    assert_eq!(peer.opened.load(Ordering::SeqCst), 2);
}
