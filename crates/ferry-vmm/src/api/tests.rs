use super::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

struct Fake(Mutex<Vec<Request>>);

impl ApiHandler for Fake {
    fn handle(&self, request: Request) -> Result<Value, Refusal> {
        self.0.lock().unwrap().push(request.clone());
        match request {
            Request::Status => Ok(serde_json::json!({
                "state": "paused", "vcpus": 2, "memory_bytes": 1u64 << 30,
                "uptime_ms": 5, "balloon": null
            })),
            Request::Migrate { to, options } if to == "ok" => {
                Ok(serde_json::json!({ "echo": options }))
            }
            Request::Migrate { .. } => Err(Refusal::new(
                ErrorCode::MigrationActive,
                "migration refused by the fake",
            )),
            _ => Ok(Value::Null),
        }
    }
}

#[test]
fn requests_have_a_stable_wire_form() {
    let j = |r: &Request| serde_json::to_string(r).unwrap();
    assert_eq!(j(&Request::Status), r#"{"cmd":"status"}"#);
    assert_eq!(j(&Request::Vcpus), r#"{"cmd":"vcpus"}"#);
    assert_eq!(
        j(&Request::BalloonSet { target_bytes: 4096 }),
        r#"{"cmd":"balloon-set","target_bytes":4096}"#
    );
    let fake = Fake(Mutex::new(Vec::new()));
    let r = answer(&fake, r#"{"cmd":"bogus"}"#);
    assert_eq!(r.code, Some(ErrorCode::BadRequest));
    assert!(!r.ok && r.error.unwrap().starts_with("bad request"));
    let r = answer(&fake, r#"{"cmd":"balloon-set","target_bytes":1,"extra":1}"#);
    assert_eq!((r.ok, r.code), (false, Some(ErrorCode::BadRequest)));
    let r = answer(&fake, "not json");
    assert_eq!((r.ok, r.code), (false, Some(ErrorCode::BadRequest)));
    // A refusal names its code on the wire, before the sentence.
    let r = answer(&fake, r#"{"cmd":"migrate","to":"x"}"#);
    assert_eq!(
        serde_json::to_string(&r).unwrap(),
        r#"{"ok":false,"code":"migration-active","error":"migration refused by the fake"}"#
    );
    assert_eq!(
        serde_json::to_string(&answer(&fake, r#"{"cmd":"pause"}"#)).unwrap(),
        r#"{"ok":true,"result":null}"#
    );
}

#[test]
fn error_codes_have_stable_names_and_unknown_ones_are_read_as_unknown() {
    use ErrorCode::*;
    let all = [
        BadRequest,
        RequestTooLong,
        TooManyClients,
        InvalidArgument,
        NoBalloon,
        VmPaused,
        MigrationActive,
        MigratedAway,
        NoMigration,
        HandedOver,
        MigrationFailed,
        OutcomeUnknown,
        Internal,
        Unknown,
    ];
    for code in all {
        let wire = serde_json::to_string(&code).unwrap();
        assert_eq!(wire, format!("\"{code}\""), "Display and the wire agree");
        assert_eq!(serde_json::from_str::<ErrorCode>(&wire).unwrap(), code);
    }
    let newer: Reply =
        serde_json::from_str(r#"{"ok":false,"code":"from-the-future","error":"x"}"#).unwrap();
    assert_eq!(newer.code, Some(Unknown));
    // A reply without a code (an older VMM) is refused as unknown, with its sentence.
    let older: Reply = serde_json::from_str(r#"{"ok":false,"error":"nope"}"#).unwrap();
    let e = older.refused();
    assert!(matches!(e, ApiError::Refused { code: Unknown, .. }), "{e}");
    assert_eq!(e.to_string(), "the VMM refused the request (unknown): nope");
}

/// A fresh directory for a test's API socket, and the socket's path in it.
fn socket_dir(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    (dir, path)
}

/// Answers `migrate` only once released, like a migration that is still running.
struct Slow(Mutex<std::sync::mpsc::Receiver<()>>);

impl ApiHandler for Slow {
    fn handle(&self, _request: Request) -> Result<Value, Refusal> {
        let _ = self.0.lock().unwrap().recv();
        Ok(serde_json::json!("done"))
    }
}

#[test]
fn the_server_is_idle_only_once_every_reply_is_written() {
    let (dir, path) = socket_dir("ferry-api-idle");
    let (release, wait) = std::sync::mpsc::channel();
    let server = serve(&path, Arc::new(Slow(Mutex::new(wait)))).unwrap();
    assert!(server.wait_idle(Duration::ZERO), "idle before any request");
    let mut c = ApiClient::connect(&path).unwrap();
    let asked = std::thread::spawn(move || {
        c.request(&Request::Migrate {
            to: "x".into(),
            options: Value::Null,
        })
    });
    // The request is being answered: a stopping VMM must wait for it.
    let started = std::time::Instant::now();
    while server.wait_idle(Duration::ZERO) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "request never arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!server.wait_idle(Duration::from_millis(50)));
    release.send(()).unwrap();
    assert!(server.wait_idle(Duration::from_secs(5)));
    assert_eq!(asked.join().unwrap().unwrap(), serde_json::json!("done"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vmm_that_closes_without_answering_is_named_not_called_malformed() {
    let (dir, path) = socket_dir("ferry-api-closed");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        // Greet, read the request, then go away without a reply, as a killed VMM does.
        let (mut stream, _) = listener.accept().unwrap();
        let greeting = serde_json::to_string(&Greeting::this()).unwrap();
        writeln!(stream, "{greeting}").unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
    });
    let err = ApiClient::connect(&path)
        .unwrap()
        .request(&Request::Status)
        .unwrap_err();
    server.join().unwrap();
    assert!(matches!(err, ApiError::Closed(_)), "{err:?}");
    assert!(err
        .to_string()
        .contains("closed the connection without answering"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn client_and_server_talk_over_a_socket() {
    let (_, path) = socket_dir("ferry-api");
    let fake = Arc::new(Fake(Mutex::new(Vec::new())));
    serve(&path, fake.clone()).unwrap();
    let mut c = ApiClient::connect(&path).unwrap();
    let s = c.status().unwrap();
    assert_eq!((s.vcpus, s.state), (2, crate::status::RunState::Paused));
    c.pause().unwrap();
    c.balloon_set(1 << 20).unwrap();
    let e = c
        .request(&Request::Migrate {
            to: "x".into(),
            options: Value::Null,
        })
        .unwrap_err();
    assert!(e.to_string().contains("refused by the fake"), "{e}");
    // `migrate` carries the options and answers with the result; the client keeps
    // working (and its reply timeout) afterwards.
    let r = c
        .migrate("ok", serde_json::json!({ "hints": false }))
        .unwrap();
    assert_eq!(r["echo"]["hints"], false);
    assert!(c.migrate("no", Value::Null).is_err());
    assert_eq!(c.status().unwrap().vcpus, 2);
    assert_eq!(
        fake.0.lock().unwrap()[..3],
        [
            Request::Status,
            Request::Pause,
            Request::BalloonSet {
                target_bytes: 1 << 20
            }
        ]
    );
    // A second client is served independently.
    ApiClient::connect(&path).unwrap().resume().unwrap();
    // Every connection starts with the greeting; over-long lines close the connection
    // with an error.
    let mut raw = UnixStream::connect(&path).unwrap();
    let mut reader = BufReader::new(raw.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    let g: Greeting = serde_json::from_str(&greeting).unwrap();
    assert_eq!(g.ferry.api, API_VERSION);
    assert!(g.ferry.vmm.starts_with("ferry-vmm "), "{greeting}");
    raw.write_all(&vec![b' '; REQUEST_BYTES_MAX as usize + 10])
        .unwrap();
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    assert!(reply.contains("too long"), "{reply}");
}

#[test]
fn a_new_handler_answers_the_next_request_of_a_connected_client() {
    // A migration destination serves its socket before the VM exists and hands it over
    // once restored: a client connected before must get the VM's answers after.
    struct NotYet;
    impl ApiHandler for NotYet {
        fn handle(&self, _request: Request) -> Result<Value, Refusal> {
            Err(Refusal::new(ErrorCode::MigrationActive, "no VM yet"))
        }
    }
    let (dir, path) = socket_dir("ferry-api-handover");
    let server = serve(&path, Arc::new(NotYet)).unwrap();
    let fake = Arc::new(Fake(Mutex::new(Vec::new())));
    let mut early = ApiClient::connect(&path).unwrap();
    let refused = early.status().unwrap_err();
    assert!(refused.to_string().contains("no VM yet"), "{refused}");
    server.set_handler(fake.clone());
    assert_eq!(early.status().unwrap().vcpus, 2);
    assert_eq!(
        ApiClient::connect(&path).unwrap().status().unwrap().vcpus,
        2
    );
    assert_eq!(fake.0.lock().unwrap().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server that greets with `line` instead of ferry's greeting.
fn greeting_server(line: &str) -> (PathBuf, PathBuf) {
    let (dir, path) = socket_dir(&format!("greet-{}", line.len()));
    let line = line.to_owned();
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = writeln!(s, "{line}");
        }
    });
    (dir, path)
}

#[test]
fn a_client_refuses_another_api_version_and_a_server_that_does_not_greet() {
    let (dir, path) = greeting_server(r#"{"ferry":{"api":2,"vmm":"ferry-vmm 9.0.0"}}"#);
    let e = ApiClient::connect(&path).unwrap_err();
    assert!(matches!(e, ApiError::Version { theirs: 2, .. }), "{e}");
    assert!(
        e.to_string()
            .contains("speaks API version 2 (ferry-vmm 9.0.0)"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
    let refusal = Reply::refusal_line(ErrorCode::TooManyClients, "too many API clients");
    let (dir, path) = greeting_server(&refusal);
    let e = ApiClient::connect(&path).unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused { code: ErrorCode::TooManyClients, message }
            if message == "too many API clients"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
    let (dir, path) = greeting_server(r#"{"QMP":{"version":{}}}"#);
    let e = ApiClient::connect(&path).unwrap_err();
    assert!(e.to_string().contains("expected the VMM's greeting"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
