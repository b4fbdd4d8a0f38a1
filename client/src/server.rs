//! What every gRPC server of the project sets up the same way.

/// Server reflection (v1 and v1alpha) over every cellbank proto and the
/// health service's, for every gRPC server of the project.
#[allow(clippy::type_complexity)]
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cellbank_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// How a server takes its connections and whom it lets call what.
pub struct Security {
    /// TLS with these credentials; `None`: plaintext (an insecure process).
    pub credentials: Option<std::sync::Arc<crate::tls::Credentials>>,
    pub policy: crate::gate::Policy,
    /// Told of every connection refused before its first call.
    pub on_handshake_refused: crate::tls::HandshakeObserver,
    /// Told of every call refused by the policy.
    pub on_denied: crate::gate::DeniedObserver,
}

/// Requests one connection may have under way at once; more wait for one
/// to finish (HTTP/2 flow control pushes back on the caller).
pub const REQUESTS_PER_CONNECTION_MAX: usize = 1024;

/// A gRPC server builder with the project's settings and `security`'s
/// gate in front of every service, and the stream of its connections
/// (handshakes done, throttled per address) to serve it on.
pub fn secured(
    listener: tokio::net::TcpListener,
    security: Security,
) -> (
    tonic::transport::Server<tower::layer::util::Stack<crate::gate::GateLayer, tower::layer::util::Identity>>,
    tokio_stream::wrappers::ReceiverStream<std::io::Result<crate::tls::ServerConn>>,
) {
    let insecure = security.credentials.is_none();
    let incoming = crate::tls::incoming(
        listener,
        security.credentials,
        std::sync::Arc::new(crate::tls::handshake_throttle()),
        security.on_handshake_refused,
    );
    let gate = crate::gate::GateLayer::new(security.policy, insecure, security.on_denied);
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(REQUESTS_PER_CONNECTION_MAX)
        .layer(gate);
    (server, incoming)
}
