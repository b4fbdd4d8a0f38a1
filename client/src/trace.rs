//! Trace context across processes: a request's trace id travels from the
//! router to the cells in gRPC metadata, as W3C `traceparent`
//! (`00-<trace id, 32 hex>-<parent span id, 16 hex>-<flags, 2 hex>`).
//!
//! The gate of every server reads it and serves the call with it as the
//! task's current trace, so that calls a router makes on behalf of the
//! request carry it on (a router starts no trace of its own). A request
//! whose flags say *sampled* (`01`) runs inside a `tracing` span named
//! `call` with the trace id, so every log line of the call carries it (text
//! and JSON logs alike), and is logged step by step at INFO: the call at
//! each process, and at the cell its proposal, commit and the standby's
//! acknowledgement. Unsampled requests log nothing extra.

use std::fmt::Write;

/// The metadata key.
pub const TRACEPARENT: &str = "traceparent";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span (this process's parent).
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// Makes a sampled call's span a child of the caller's span (an exporter's).
pub type AdoptHook = fn(&tracing::Span, &TraceContext);
/// The exported id of the current span, to name as the parent of calls
/// made on (an exporter's).
pub type SpanIdHook = fn() -> Option<[u8; 8]>;

static EXPORTER_HOOKS: std::sync::OnceLock<(AdoptHook, SpanIdHook)> = std::sync::OnceLock::new();

/// Set once by a process that exports its spans (OTLP).
pub fn set_exporter_hooks(adopt: AdoptHook, span_id: SpanIdHook) {
    let _ = EXPORTER_HOOKS.set((adopt, span_id));
}

/// Links a sampled call's span to its caller's, when spans are exported.
pub fn adopt(span: &tracing::Span, context: &TraceContext) {
    if let Some((adopt, _)) = EXPORTER_HOOKS.get() {
        adopt(span, context);
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl TraceContext {
    /// A new trace (random id), sampled or not.
    pub fn new(sampled: bool) -> TraceContext {
        TraceContext { trace_id: rand::random(), parent_id: rand::random(), sampled }
    }

    /// Parses a `traceparent` value; `None` for anything malformed (an
    /// all-zero id, another version's layout, upper-case hex).
    pub fn parse(value: &str) -> Option<TraceContext> {
        let mut parts = value.trim().split('-');
        let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id = unhex::<16>(trace)?;
        let parent_id = unhex::<8>(parent)?;
        let flags = unhex::<1>(flags)?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceContext { trace_id, parent_id, sampled: flags & 1 == 1 })
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The value to send on: the same trace, and this process's span (the
    /// exported one when spans are exported, else a new id).
    pub fn child_header(&self) -> String {
        let exported = EXPORTER_HOOKS.get().and_then(|(_, span_id)| span_id());
        let span: [u8; 8] = exported.unwrap_or_else(rand::random);
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&span), u8::from(self.sampled))
    }

    /// From a request's metadata (gRPC) or headers (HTTP/2).
    pub fn from_headers(headers: &http::HeaderMap) -> Option<TraceContext> {
        headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceContext::parse)
    }
}

/// The trace of the call this task serves, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|c| *c).ok()
}

/// Whether the call this task serves is sampled (its steps are logged).
pub fn sampled() -> bool {
    current().is_some_and(|c| c.sampled)
}

/// Runs `future` as part of `context`'s trace.
pub async fn scope<F: std::future::Future>(context: TraceContext, future: F) -> F::Output {
    CURRENT.scope(context, future).await
}

/// Adds the current trace (if any) to an outgoing call's metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(context) = current() {
        if let Ok(value) = context.child_header().parse() {
            metadata.insert(TRACEPARENT, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_malformed_ones_are_ignored() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(value).unwrap();
        assert!(context.sampled);
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = TraceContext::parse(&context.child_header()).unwrap();
        assert_eq!((child.trace_id, child.sampled), (context.trace_id, true));
        assert_ne!(child.parent_id, context.parent_id);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        assert!(!TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().sampled);
    }

    #[tokio::test]
    async fn the_current_trace_is_the_scopes_and_goes_out_with_calls() {
        assert_eq!(current(), None);
        let context = TraceContext::new(true);
        let sent = scope(context, async {
            assert!(sampled());
            let mut metadata = tonic::metadata::MetadataMap::new();
            inject(&mut metadata);
            metadata.get(TRACEPARENT).unwrap().to_str().unwrap().to_string()
        })
        .await;
        assert_eq!(TraceContext::parse(&sent).unwrap().trace_id, context.trace_id);
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject(&mut metadata);
        assert!(metadata.is_empty(), "no trace outside a scope");
    }
}
