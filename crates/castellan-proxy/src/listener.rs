//! The one accept loop every listener of the proxy uses: a cap on open connections (beyond it
//! new ones are closed at once and counted), TCP_NODELAY, and back-off instead of a spin when
//! accepting fails (file descriptors exhausted). Handshake and idle limits are the handler's
//! (TLS within 10 s, request heads within 10 s of waiting).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Most connections one listener keeps open.
pub(crate) const MAX_CONNECTIONS: usize = 10_000;

/// An open connection's place under the cap; given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts on `listener` until `stop`, running `handle` for each connection in its own task.
pub(crate) async fn accept_loop<F, Fut>(
    name: &'static str,
    proxy: String,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(AtomicUsize::new(0));
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => {
                backoff = Duration::from_millis(10);
                c
            }
            Err(e) => {
                if backoff == Duration::from_millis(10) {
                    tracing::warn!(listener = name, error = %e, "accept failed; backing off");
                }
                metrics::counter!("castellan_proxy_accept_errors_total", "proxy" => proxy.clone(), "listener" => name).increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("castellan_proxy_connections_refused_total", "proxy" => proxy.clone(), "listener" => name).increment(1);
            drop(tcp);
            continue;
        }
        let slot = Slot(open.clone());
        let _ = tcp.set_nodelay(true);
        let fut = handle(tcp, peer);
        tokio::spawn(async move {
            let _slot = slot;
            fut.await;
        });
    }
}
