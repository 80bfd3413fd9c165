//! A chat whose clients stay connected through upgrades:
//! `chat --listen ADDR [--pid-file PATH] [--control PATH]`; SIGHUP (or `chat reload --control
//! PATH`) upgrades it in place, SIGTERM stops it. `ws://ADDR/ws?room=NAME` (default `lobby`): each
//! message a client sends goes to every client of its room, the sender included, as it was sent.
//! On an upgrade each connection moves to the successor with its room (its payload), between two
//! messages; the successor rebuilds the rooms from the connections it takes.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::{Router, extract::Query, extract::Request, routing::get};
use futures_util::{SinkExt, StreamExt};
use handover::websocket::{self, WebSocket, tokio_tungstenite::tungstenite::Message};
use handover::{Handover, control, serve::Server, serve::Triggers};
use tokio::{signal::unix::SignalKind, sync::broadcast};

/// Each room: the sender its members subscribe to.
type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<Message>>>>;

async fn chat(mut ws: WebSocket, rooms: Rooms, room: String) {
    let tx = rooms
        .lock()
        .unwrap()
        .entry(room.clone())
        .or_insert_with(|| broadcast::channel(256).0)
        .clone();
    let mut rx = tx.subscribe();
    let leaving = ws.get_ref().leaving(); // this generation drains: time to move
    tokio::pin!(leaving);
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => { let _ = tx.send(m); }
                Some(Ok(_)) => {} // pings are answered by tungstenite
                _ => break,       // closed, or gone
            },
            got = rx.recv() => match got {
                Ok(m) => if ws.send(m).await.is_err() { break },
                Err(_) => break, // fell 256 messages behind
            },
            () = &mut leaving => {
                while let Ok(m) = rx.try_recv() { let _ = ws.feed(m).await; } // the room's, sent first
                // To the successor with its room; or closed with 1012 and the client reconnects.
                if let Err(e) = websocket::hand_over(ws, room.clone()).await { eprintln!("chat: {e}") }
                break;
            }
        }
    }
    drop(rx);
    let mut rooms = rooms.lock().unwrap();
    if tx.receiver_count() == 0 {
        rooms.remove(&room);
    } // the last one left
}

fn main() -> Result<std::process::ExitCode, Box<dyn std::error::Error>> {
    if let Some(code) = control::command(std::env::args_os().skip(1)) {
        return Ok(code); // `chat reload …` and `chat status …`
    }
    let flag = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let mut builder = Handover::builder();
    if let Some(path) = flag("--pid-file") {
        builder = builder.pid_file(path);
    }
    let handover = builder.build()?; // inherits the listener; first, before any other fd is opened
    tokio::runtime::Runtime::new()?.block_on(async {
        let addr = flag("--listen").unwrap_or("127.0.0.1:8080".into());
        let listener = handover.tcp_listener("http", addr)?;
        let addr = listener.local_addr()?; // inherited, or bound now
        let mut triggers = Triggers::new(&handover).upgrade_on(SignalKind::hangup());
        if let Some(path) = flag("--control") {
            triggers = triggers.control(control::bind(&handover, path)?);
        }
        triggers.stop_on(SignalKind::terminate()).spawn()?;
        let rooms = Rooms::default();
        // Before ready(): it tells the predecessor that this generation takes its connections.
        let server = Server::new(&handover).listener(listener).websocket({
            let rooms = rooms.clone(); // a connection handed over, with its room
            move |ws, room| {
                chat(
                    ws,
                    rooms.clone(),
                    String::from_utf8_lossy(&room).into_owned(),
                )
            }
        });
        handover.ready()?;
        println!("listening on {addr} pid {}", std::process::id());
        let app = Router::new().route(
            "/ws",
            get(
                |Query(q): Query<HashMap<String, String>>, req: Request| async move {
                    let room = q.get("room").cloned().unwrap_or_else(|| "lobby".into());
                    websocket::upgrade(req, move |ws| chat(ws, rooms, room)) // 101, then chat()
                },
            ),
        );
        eprintln!("drained: {:?}", server.serve(app).await?); // all moved, or the drain timeout
        Ok(std::process::ExitCode::SUCCESS)
    })
}
