//! A TCP proxy between a client and the server that can turn into a black hole: it stops
//! forwarding in both directions while keeping both sockets open, so neither side sees a FIN or
//! an RST. That is what a vanished network (a phone in a tunnel, a dead NAT entry) looks like to
//! the server, which must then find out through its keepalive.
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct BlackholeProxy {
    /// Where clients connect instead of the server.
    pub addr: SocketAddr,
    /// True while bytes are forwarded; false turns the proxy into a black hole.
    forwarding: watch::Sender<bool>,
    /// Accepts connections; owns the forwarding tasks, which are aborted with it.
    accept: JoinHandle<()>,
}

impl BlackholeProxy {
    pub async fn start(upstream: SocketAddr) -> BlackholeProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the proxy binds a loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (forwarding, rx) = watch::channel(true);
        let accept = tokio::spawn(async move {
            // Dropped (and so aborted) with this task.
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                pipes.spawn(pipe(client_read, server_write, rx.clone()));
                pipes.spawn(pipe(server_read, client_write, rx.clone()));
            }
        });
        BlackholeProxy {
            addr,
            forwarding,
            accept,
        }
    }

    /// From now on nothing gets through, in either direction, and nothing is closed.
    pub fn blackhole(&self) {
        self.forwarding.send_replace(false);
    }
}

impl Drop for BlackholeProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to` while forwarding; in black-hole mode reads and discards (so the sender
/// never sees back-pressure either), and never closes `to`.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, forwarding: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !*forwarding.borrow() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if !*forwarding.borrow() {
        // A close from one side is swallowed too: the other side must not hear of it.
        std::future::pending::<()>().await;
    }
    // While forwarding, dropping `to` passes the FIN on, as a polite close.
}
