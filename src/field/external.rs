//! A velocity field computed by another process (the user's network, in any framework).
//!
//! `external:CMD` starts `sh -c CMD` once. Per evaluation oracleflow writes three .npy
//! arrays back to back to its stdin: x (float32, (B, *sample_shape)), t (float32, (B,)),
//! y (int64, (B,), the class or -1 for unconditional); it reads one .npy from its stdout:
//! the velocity, float32, x's shape. Closing stdin asks the process to end. Its stderr is
//! ours (passes through).
//!
//! Pipes are served by two threads so that nothing here can block for ever: a writer
//! (a child that stops reading would block a plain write once the pipe is full) and a
//! reader whose frames arrive on a channel waited on with `--field-timeout`. Every failure
//! is one line naming the command; after one, the field refuses further evaluations.

use std::io::{Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::{check_request, FieldEval, VelocityField};
use crate::dataset::npy::{self, NpyDtype};
use crate::error::{Error, Result};
use crate::path::Path;

/// How long a process may take to end after its stdin closes before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// What the reader thread hands over: one reply, or why there is none.
enum Frame {
    Reply(Vec<usize>, Vec<f32>),
    /// stdout closed at a frame boundary (the process ended or closed it)
    Closed,
    /// stdout carried something that is not a float32 .npy
    Bad(String),
}

pub struct ExternalField {
    command: String,
    child: Child,
    /// Frames to write to stdin; dropping it closes stdin.
    to_stdin: Option<Sender<Vec<u8>>>,
    replies: Receiver<Frame>,
    sample_shape: Vec<usize>,
    path: Path,
    timeout: Duration,
    evaluations: usize,
    /// The first failure; later evaluations repeat it.
    failed: Option<String>,
}

impl ExternalField {
    /// Starts `sh -c command`; samples have `sample_shape` (D values); velocities are read
    /// as the velocity on `path` (for x1_hat); a reply must come within `timeout`.
    pub fn start(
        command: &str,
        sample_shape: &[usize],
        path: Path,
        timeout: Duration,
    ) -> Result<Self> {
        let mut cmd = Command::new("sh");
        // Its own process group, so that a kill reaches what sh started too (sh need not
        // exec the command, and an orphan would hold our stderr open).
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                Error::Input(format!("external field `{command}`: cannot start sh: {e}"))
            })?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (to_stdin, frames) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            // A write error means the process is gone; the reader reports that.
            for frame in frames {
                if stdin.write_all(&frame).and_then(|_| stdin.flush()).is_err() {
                    break;
                }
            }
        });
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || read_frames(stdout, tx));
        Ok(ExternalField {
            command: command.to_string(),
            child,
            to_stdin: Some(to_stdin),
            replies,
            sample_shape: sample_shape.to_vec(),
            path,
            timeout,
            evaluations: 0,
            failed: None,
        })
    }

    /// Kills the process and everything in its group, and reaps it.
    fn kill(&mut self) {
        #[cfg(unix)]
        // SAFETY: kill(2) with a negative pid signals the process group the child leads
        // (made with process_group(0)); it touches no memory.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn fail(&mut self, why: String) -> Error {
        let msg = format!("external field `{}`: {why}", self.command);
        self.failed = Some(msg.clone());
        Error::Input(msg)
    }

    /// Why the process stopped replying: its exit status if it has ended.
    fn exit_reason(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return format!("the process exited ({status}) without replying")
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return "the process closed its stdout without replying".into(),
            }
        }
    }
}

/// Reads .npy frames from the child's stdout until it closes or sends something else.
fn read_frames(mut stdout: ChildStdout, tx: Sender<Frame>) {
    loop {
        let frame = read_frame(&mut stdout);
        let last = !matches!(frame, Frame::Reply(..));
        if tx.send(frame).is_err() || last {
            return;
        }
    }
}

fn read_frame(r: &mut impl Read) -> Frame {
    let source = std::path::Path::new("stdout");
    let mut pre = vec![0u8; 10];
    // The first byte decides between a clean end and a frame.
    match read_full(r, &mut pre[..1]) {
        Ok(0) => return Frame::Closed,
        Ok(_) => {}
        Err(e) => return Frame::Bad(format!("reading its stdout: {e}")),
    }
    let got = match read_full(r, &mut pre[1..]) {
        Ok(n) => n + 1,
        Err(e) => return Frame::Bad(format!("reading its stdout: {e}")),
    };
    if got < 10 || !pre.starts_with(b"\x93NUMPY") {
        return Frame::Bad(format!(
            "replied with bytes that are not .npy (starting {:?})",
            String::from_utf8_lossy(&pre[..got.min(10)])
        ));
    }
    let header_len = match pre[6] {
        1 => u16::from_le_bytes([pre[8], pre[9]]) as usize,
        2 | 3 => {
            let mut more = [0u8; 2];
            if read_full(r, &mut more).map_or(true, |n| n < 2) {
                return Frame::Bad("reply truncated in its .npy header".into());
            }
            pre.extend_from_slice(&more);
            u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as usize
        }
        v => return Frame::Bad(format!("replied with .npy format version {v}")),
    };
    if header_len > 1 << 20 {
        return Frame::Bad(format!("replied with a {header_len}-byte .npy header"));
    }
    let start = pre.len();
    pre.resize(start + header_len, 0);
    if read_full(r, &mut pre[start..]).map_or(true, |n| n < header_len) {
        return Frame::Bad("reply truncated in its .npy header".into());
    }
    let (header, n_bytes) = match npy::parse_header_prefix(&pre, source) {
        Ok(h) => h,
        Err(e) => return Frame::Bad(format!("replied with a bad .npy header: {e}")),
    };
    if header.dtype != NpyDtype::F32 {
        return Frame::Bad(format!(
            "replied with dtype {}, not float32 (<f4)",
            header.dtype.descr()
        ));
    }
    let mut data = vec![0u8; n_bytes];
    if read_full(r, &mut data).map_or(true, |n| n < n_bytes) {
        return Frame::Bad(format!(
            "reply truncated: shape {:?} needs {n_bytes} bytes of data",
            header.shape
        ));
    }
    let values = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Frame::Reply(header.shape, values)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl VelocityField for ExternalField {
    fn dim(&self) -> usize {
        self.sample_shape.iter().product()
    }

    fn describe(&self) -> String {
        format!("external: `{}`", self.command)
    }

    fn accepts_classes(&self) -> bool {
        // The process receives the class of every state; what it makes of it is its own.
        true
    }

    fn evaluate(&mut self, x: &[f64], t: &[f64], classes: &[Option<u32>]) -> Result<FieldEval> {
        if let Some(msg) = &self.failed {
            return Err(Error::Input(msg.clone()));
        }
        let dim = self.dim();
        let b = check_request(dim, x, t, classes)?;
        let mut shape = vec![b];
        shape.extend(&self.sample_shape);
        let xs: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let ts: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let ys: Vec<i64> = classes.iter().map(|c| c.map_or(-1, |c| c as i64)).collect();
        let mut frame = npy::encode_f32(&shape, &xs);
        frame.extend(npy::encode_f32(&[b], &ts));
        frame.extend(npy::encode_i64(&[b], &ys));
        let sent = self
            .to_stdin
            .as_ref()
            .is_some_and(|tx| tx.send(frame).is_ok());
        if !sent {
            let why = self.exit_reason();
            return Err(self.fail(why));
        }
        self.evaluations += 1;
        let (got_shape, u) = match self.replies.recv_timeout(self.timeout) {
            Ok(Frame::Reply(s, u)) => (s, u),
            Ok(Frame::Bad(why)) => return Err(self.fail(why)),
            Ok(Frame::Closed) | Err(RecvTimeoutError::Disconnected) => {
                let why = self.exit_reason();
                return Err(self.fail(why));
            }
            Err(RecvTimeoutError::Timeout) => {
                let why = format!(
                    "no reply within {} s (--field-timeout)",
                    self.timeout.as_secs_f64()
                );
                return Err(self.fail(why));
            }
        };
        if got_shape != shape {
            return Err(self.fail(format!(
                "replied with shape {got_shape:?}, expected {shape:?}"
            )));
        }
        let velocity: Vec<f64> = u.iter().map(|&v| v as f64).collect();
        // The field gives only u = a x1_hat + b x; a > 0 on both paths for t < 1.
        let mut x1_hat = vec![0.0; x.len()];
        for (q, &tq) in t.iter().enumerate() {
            let (a, bb) = self.path.coefs(tq).velocity_coefs();
            let r = q * dim..(q + 1) * dim;
            for ((h, u), xv) in x1_hat[r.clone()]
                .iter_mut()
                .zip(&velocity[r.clone()])
                .zip(&x[r])
            {
                *h = (u - bb * xv) / a;
            }
        }
        Ok(FieldEval {
            velocity,
            x1_hat,
            stats: None,
        })
    }

    fn evaluations(&self) -> usize {
        self.evaluations
    }
}

impl Drop for ExternalField {
    fn drop(&mut self) {
        // Closing stdin is the request to end; a process that does not is killed.
        self.to_stdin = None;
        if self.failed.is_some() {
            // A process that failed (silent, garbled) gets no grace period.
            self.kill();
            return;
        }
        let deadline = Instant::now() + EXIT_GRACE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        self.kill();
    }
}
