//! The forward of a sign request from a follower to the leader: the
//! [`Forward`] trait the signer sends through, its transport on a real
//! node (the peer port, mTLS gRPC: [`Peers`]), and the leader's gRPC end
//! ([`SignerService`]).
//!
//! Owns: moving a request and its reply between members, and who may
//! send one. Must not: decide or sign; [`super::Signer::serve`] does.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Signer, MAX_PRIVVAL_MESSAGE};
use crate::config::NodeId;
use crate::pb;
use crate::raft::network::Peers;

/// How a follower's sign request reaches the leader.
pub trait Forward: Send + Sync + 'static {
    /// Sends `req` to the leader `leader`; its reply, or why none came
    /// within `limit`.
    fn forward(
        &self,
        leader: NodeId,
        req: pb::SignRequest,
        limit: Duration,
    ) -> impl Future<Output = Result<pb::SignReply, String>> + Send;
}

/// A real node forwards over the peer port (mTLS gRPC).
impl Forward for Peers {
    async fn forward(
        &self,
        leader: NodeId,
        req: pb::SignRequest,
        limit: Duration,
    ) -> Result<pb::SignReply, String> {
        let channel = self.channel(leader).map_err(|e| e.to_string())?;
        let mut client = pb::signer_client::SignerClient::new(channel)
            .max_decoding_message_size(MAX_PRIVVAL_MESSAGE)
            .max_encoding_message_size(MAX_PRIVVAL_MESSAGE);
        self.call(leader, limit, client.sign(self.request(req, limit)))
            .await
            .map_err(|e| e.to_string())
    }
}

/// The leader's peer-port service for forwarded sign requests.
pub struct SignerService {
    signer: Arc<Signer>,
}

impl SignerService {
    pub fn new(signer: Arc<Signer>) -> Self {
        Self { signer }
    }
}

#[tonic::async_trait]
impl pb::signer_server::Signer for SignerService {
    async fn sign(&self, req: Request<pb::SignRequest>) -> Result<Response<pb::SignReply>, Status> {
        // Only a host that may hold the key serves sentries (its own privval
        // connections): a witness asks nothing.
        let peer = crate::tls::require_validator(&req, "forward sign requests")?;
        let reply = self.signer.serve(peer, req.get_ref()).await?;
        Ok(Response::new(reply))
    }
}
