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

/// How a process's servers take their connections and whom they let call
/// what: the same credentials, policy and throttles on every plane.
#[derive(Clone)]
pub struct Security {
    /// TLS with these credentials; `None`: plaintext (an insecure process).
    pub credentials: Option<std::sync::Arc<crate::tls::Credentials>>,
    pub policy: crate::gate::Policy,
    /// Told of every connection refused before its first call.
    pub on_handshake_refused: crate::tls::HandshakeObserver,
    /// Told of every call refused by the policy.
    pub on_denied: crate::gate::DeniedObserver,
    /// Failed handshakes per address, over all of the process's listeners.
    handshakes: std::sync::Arc<crate::throttle::Throttle<std::net::IpAddr>>,
    /// Refused calls per identity, over all of the process's listeners.
    calls: std::sync::Arc<crate::throttle::Throttle<std::sync::Arc<crate::tls::Identity>>>,
    /// Told of every call let in (latency and result metrics).
    on_call: Option<crate::gate::CallObserver>,
}

impl Security {
    pub fn new(
        credentials: Option<std::sync::Arc<crate::tls::Credentials>>,
        policy: crate::gate::Policy,
        on_handshake_refused: crate::tls::HandshakeObserver,
        on_denied: crate::gate::DeniedObserver,
    ) -> Security {
        Security {
            credentials,
            policy,
            on_handshake_refused,
            on_denied,
            handshakes: std::sync::Arc::new(crate::tls::handshake_throttle()),
            calls: std::sync::Arc::new(crate::throttle::Throttle::standard()),
            on_call: None,
        }
    }

    /// The same, telling `on_call` of every call let in.
    pub fn observing_calls(self, on_call: crate::gate::CallObserver) -> Security {
        Security { on_call: Some(on_call), ..self }
    }
}

/// How often gRPC health is brought in line with readiness: a new leader
/// says SERVING within this (the coordinator finds leaders by it).
pub const HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(25);

/// Keeps gRPC health (the whole server, `""`, and each of `services`) in
/// line with `ready`: SERVING while it answers `Ok`, NOT_SERVING while it
/// names a reason. Runs until aborted.
pub async fn follow_readiness(
    mut reporter: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
    ready: std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
) {
    use tonic_health::ServingStatus;
    let mut was: Option<bool> = None;
    loop {
        let now = ready();
        if was != Some(now.is_ok()) {
            let status = if now.is_ok() { ServingStatus::Serving } else { ServingStatus::NotServing };
            for service in std::iter::once("").chain(services.iter().copied()) {
                reporter.set_service_status(service, status).await;
            }
            match &now {
                Ok(()) => tracing::info!("ready: gRPC health says SERVING"),
                Err(why) => tracing::info!("not ready ({why}): gRPC health says NOT_SERVING"),
            }
            was = Some(now.is_ok());
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// Requests one connection may have under way at once; more wait for one
/// to finish (HTTP/2 flow control pushes back on the caller).
pub const REQUESTS_PER_CONNECTION_MAX: usize = 1024;

/// Longest a call on the client plane may take when its caller set no
/// shorter deadline (`grpc-timeout`): every call there is unary.
pub const CLIENT_CALL_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// The same on the admin plane (an audit of a large ledger takes a while).
pub const ADMIN_CALL_MAX: std::time::Duration = std::time::Duration::from_secs(300);
/// HTTP/2 pings on every server connection: a peer that stops answering
/// them for [`KEEPALIVE_TIMEOUT`] is dropped with its calls and streams.
/// This bounds the peer plane's long-lived streams (Raft, the standby
/// stream), which live as long as their connection answers; each also has
/// its own limits between messages (snapshot chunks, standby acks).
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A server builder with the project's settings and the gate of
/// `security`'s policy on one plane in front of every service.
pub type Builder =
    tonic::transport::Server<tower::layer::util::Stack<crate::gate::GateLayer, tower::layer::util::Identity>>;

/// The services of one plane, ready to serve.
pub type Planed =
    tonic::transport::server::Router<tower::layer::util::Stack<crate::gate::GateLayer, tower::layer::util::Identity>>;

/// A gRPC server builder for `plane` with the project's settings and
/// `security`'s gate in front of every service, and the stream of its
/// connections (handshakes done, identities let in by the plane, throttled
/// per address) to serve it on.
pub fn secured(
    listener: tokio::net::TcpListener,
    plane: crate::planes::Plane,
    security: &Security,
) -> (Builder, tokio_stream::wrappers::ReceiverStream<std::io::Result<crate::tls::ServerConn>>) {
    let insecure = security.credentials.is_none();
    let policy = security.policy.on(plane);
    let connections = policy.clone();
    let incoming = crate::tls::incoming(
        listener,
        security.credentials.clone(),
        security.handshakes.clone(),
        security.on_handshake_refused.clone(),
        std::sync::Arc::new(move |identity: &crate::tls::Identity| connections.admits_connection(identity)),
    );
    let gate =
        crate::gate::GateLayer::with_throttle(policy, insecure, security.on_denied.clone(), security.calls.clone())
            .observing(security.on_call.clone());
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(REQUESTS_PER_CONNECTION_MAX)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    let server = match plane {
        crate::planes::Plane::Client => server.timeout(CLIENT_CALL_MAX),
        crate::planes::Plane::Admin => server.timeout(ADMIN_CALL_MAX),
        crate::planes::Plane::Peer => server,
    };
    let server = server.layer(gate);
    (server, incoming)
}

/// The listeners of a process known by `listen`: one per plane, on the
/// planes' ports ([`crate::planes`]).
pub struct Listeners {
    /// The process's address (the client plane's).
    pub addr: std::net::SocketAddr,
    listeners: Vec<(crate::planes::Plane, tokio::net::TcpListener)>,
}

impl Listeners {
    pub async fn bind(listen: std::net::SocketAddr) -> std::io::Result<Listeners> {
        crate::planes::check_process_addr(&listen.to_string()).map_err(std::io::Error::other)?;
        let mut listeners = Vec::new();
        for plane in crate::planes::Plane::ALL {
            let addr = plane.listen(listen);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("{plane} plane: cannot listen on {addr}: {e}")))?;
            listeners.push((plane, listener));
        }
        Ok(Listeners { addr: listen, listeners })
    }
}

/// A process's servers, one per plane, until [`Serving::stop`].
pub struct Serving {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

/// Serves every plane of `listeners`, each with the services `services`
/// mounts for it.
pub fn serve(
    listeners: Listeners,
    security: &Security,
    services: impl Fn(crate::planes::Plane, Builder) -> Planed,
) -> Serving {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = listeners
        .listeners
        .into_iter()
        .map(|(plane, listener)| {
            let (server, incoming) = secured(listener, plane, security);
            let mut stopped = stopped.clone();
            tokio::spawn(services(plane, server).serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }))
        })
        .collect();
    Serving { stop, tasks }
}

impl Serving {
    /// Stops taking calls: waits up to `grace` for calls under way, then
    /// drops the rest.
    pub async fn stop(self, grace: std::time::Duration) {
        let _ = self.stop.send(true);
        for mut task in self.tasks {
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}
