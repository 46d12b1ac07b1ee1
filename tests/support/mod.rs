//! Shared by the Moonraker and print-safety gate tests: a reporter that records what the
//! gate says and answers its questions, and a plain web server that is not Moonraker.
#![allow(dead_code)]

pub mod real_moonraker;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use kflash::app::flash::Reporter;
use kflash::event::words::{describe, Tone};
use kflash::event::Event;

/// Records events (and their lines) and questions; answers every question with `answer` (what `--yes`
/// does when true, and a non-terminal without `--yes` when false).
pub struct Answers {
    pub answer: bool,
    pub questions: Vec<String>,
    pub lines: Vec<String>,
    pub events: Vec<Event>,
}

impl Answers {
    pub fn yes() -> Answers {
        Answers { answer: true, questions: Vec::new(), lines: Vec::new(), events: Vec::new() }
    }

    pub fn no() -> Answers {
        Answers { answer: false, questions: Vec::new(), lines: Vec::new(), events: Vec::new() }
    }

    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

impl Reporter for Answers {
    fn event(&mut self, e: &Event) {
        for line in describe(&e.kind) {
            self.lines.push(match line.tone {
                Tone::Warning => format!("warning: {}", line.text),
                _ => line.text,
            });
        }
        self.events.push(e.clone());
    }

    fn confirm(&mut self, question: &str) -> futures::future::LocalBoxFuture<'static, bool> {
        self.questions.push(question.to_string());
        let answer = self.answer;
        Box::pin(async move { answer })
    }
}

/// A URL where nothing listens (connection refused).
pub fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}")
}

/// `python3 -m http.server` on a free loopback port: a web server that is not Moonraker
/// (it answers `/server/info` with its HTML 404 page). Killed on drop.
pub struct PlainWebServer {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl PlainWebServer {
    pub fn start() -> PlainWebServer {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("python3")
            .args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "0"])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .unwrap_or_else(|| panic!("http.server said {line:?}"))
            .to_string();
        PlainWebServer { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }
}

impl Drop for PlainWebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
