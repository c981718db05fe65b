//! The hello-world baseline: an in-process actix-web endpoint that answers a small JSON POST
//! without doing anything, on the same machine, workers and client as the measured scenario.
//! Its throughput is the ceiling HTTP itself allows here; every figure is reported beside it.

use actix_web::{web, App, HttpResponse, HttpServer};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;

/// A running hello server; stopped on drop.
pub struct HelloServer {
    pub addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn hello(body: web::Bytes) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(format!("{{\"ok\":true,\"bytes\":{}}}", body.len()))
}

impl HelloServer {
    pub fn start(workers: usize) -> std::io::Result<HelloServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let server = HttpServer::new(|| App::new().route("/hello", web::post().to(hello)))
                    .workers(workers)
                    .disable_signals()
                    .listen(listener);
                match server {
                    Ok(server) => {
                        let server = server.run();
                        let _ = tx.send(Ok(server.handle()));
                        let _ = server.await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        });
        let handle = rx
            .recv()
            .map_err(|_| std::io::Error::other("hello server thread died"))??;
        Ok(HelloServer {
            addr,
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for HelloServer {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        let _ = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(handle.stop(false));
        })
        .join();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
