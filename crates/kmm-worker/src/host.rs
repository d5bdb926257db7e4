//! The worker's contact with the node: running modprobe with its output streamed to the log,
//! reading the kernel log, the firmware search path, firmware files and `/sys/module`.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;

/// How many trailing lines of modprobe output are kept for classification.
const KEPT_OUTPUT_LINES: usize = 40;

/// The outcome of one modprobe run.
#[derive(Debug)]
pub struct ModprobeRun {
    pub status: ExitStatus,
    /// The last lines of stdout and stderr (stdout first).
    pub output: Vec<String>,
    /// Kernel log records written while modprobe ran (empty when the log is not readable).
    pub kernel_log: Vec<String>,
}

/// Runs `modprobe <args>`, streaming its stdout and stderr line by line to our stderr.
pub fn run_modprobe(args: &[String]) -> io::Result<ModprobeRun> {
    log(&format!("running: modprobe {}", args.join(" ")));
    let mut kernel_log = KernelLog::open_at_end();
    let mut child = Command::new("modprobe")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| io::Error::new(err.kind(), format!("starting modprobe: {err}")))?;
    let stdout = child
        .stdout
        .take()
        .map(|s| stream_lines(s, "modprobe/stdout"));
    let stderr = child
        .stderr
        .take()
        .map(|s| stream_lines(s, "modprobe/stderr"));
    let status = child.wait()?;
    let mut output = Vec::new();
    for reader in [stdout, stderr].into_iter().flatten() {
        output.extend(reader.join().unwrap_or_default());
    }
    let kernel_log = kernel_log
        .as_mut()
        .map(KernelLog::read_new)
        .unwrap_or_default();
    for line in &kernel_log {
        log(&format!("kernel: {line}"));
    }
    Ok(ModprobeRun {
        status,
        output,
        kernel_log,
    })
}

fn stream_lines(
    stream: impl Read + Send + 'static,
    prefix: &'static str,
) -> thread::JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let mut kept = VecDeque::with_capacity(KEPT_OUTPUT_LINES);
        for line in BufReader::new(stream).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            eprintln!("{prefix}: {line}");
            if kept.len() == KEPT_OUTPUT_LINES {
                kept.pop_front();
            }
            kept.push_back(line);
        }
        kept.into()
    })
}

/// `/dev/kmsg`, positioned after the records that existed when it was opened.
struct KernelLog(File);

// The value of O_NONBLOCK on the architectures KMM ships for; elsewhere the log is not read.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "powerpc64",
    target_arch = "s390x",
    target_arch = "riscv64"
))]
const O_NONBLOCK: Option<i32> = Some(0o4000);
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "powerpc64",
    target_arch = "s390x",
    target_arch = "riscv64"
)))]
const O_NONBLOCK: Option<i32> = None;

impl KernelLog {
    /// Best effort: the log may be absent or restricted in a container.
    fn open_at_end() -> Option<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NONBLOCK?)
            .open("/dev/kmsg")
            .ok()?;
        file.seek(SeekFrom::End(0)).ok()?;
        Some(KernelLog(file))
    }

    /// The message text of every record written since the last call.
    fn read_new(&mut self) -> Vec<String> {
        let mut messages = Vec::new();
        // One read returns one record; the kernel caps records well below this size.
        let mut record = vec![0u8; 8192];
        loop {
            match self.0.read(&mut record) {
                Ok(0) => break,
                Ok(n) => messages.extend(kmsg_message(&record[..n])),
                // A record was overwritten before we read it; the next read continues.
                Err(err) if err.raw_os_error() == Some(32) => continue,
                Err(_) => break, // WouldBlock: nothing more
            }
            if messages.len() > 1000 {
                break;
            }
        }
        messages
    }
}

/// The text of one `/dev/kmsg` record: `prio,seq,time,flags;text\n[ KEY=value\n...]`.
fn kmsg_message(record: &[u8]) -> Option<String> {
    let record = String::from_utf8_lossy(record);
    let (_, rest) = record.split_once(';')?;
    let text = rest.lines().next().unwrap_or_default();
    Some(text.replace("\\x0a", " "))
}

/// Points the kernel's firmware loader at `dir`, unless it already looks there.
pub fn set_firmware_class_path(dir: &Path) -> io::Result<()> {
    const PARAMETER: &str = "/sys/module/firmware_class/parameters/path";
    let wanted = dir.to_string_lossy();
    let current = fs::read_to_string(PARAMETER).unwrap_or_default();
    if current.trim_end() == wanted {
        log(&format!("{PARAMETER} is already {wanted}"));
        return Ok(());
    }
    fs::write(PARAMETER, wanted.as_bytes()).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("writing {wanted} to {PARAMETER}: {err}"),
        )
    })?;
    log(&format!("set {PARAMETER} to {wanted}"));
    Ok(())
}

/// Every file under `root`, as paths relative to it (symlinks are listed, not followed).
pub fn relative_files(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let mut entries = fs::read_dir(&dir)
            .map_err(|err| io::Error::new(err.kind(), format!("reading {}: {err}", dir.display())))?
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let path = relative.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Copies every file under `from` to the same relative path under `to`.
pub fn copy_firmware(from: &Path, to: &Path) -> io::Result<usize> {
    let files = relative_files(from)?;
    for file in &files {
        let target = to.join(file);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|err| {
                io::Error::new(err.kind(), format!("creating {}: {err}", parent.display()))
            })?;
        }
        fs::copy(from.join(file), &target).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("copying to {}: {err}", target.display()),
            )
        })?;
        log(&format!("copied firmware {}", target.display()));
    }
    Ok(files.len())
}

/// Deletes from `to` every file that exists under `from`, then the directories that this left
/// empty. Errors are logged, never fatal: the module is already unloaded.
pub fn remove_firmware(from: &Path, to: &Path) {
    let files = match relative_files(from) {
        Ok(files) => files,
        Err(err) => {
            log(&format!("warning: cannot list firmware to remove: {err}"));
            return;
        }
    };
    let mut dirs = std::collections::BTreeSet::new();
    for file in &files {
        let target = to.join(file);
        match fs::remove_file(&target) {
            Ok(()) => log(&format!("removed firmware {}", target.display())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => log(&format!("warning: removing {}: {err}", target.display())),
        }
        dirs.extend(
            file.ancestors()
                .skip(1)
                .filter(|d| !d.as_os_str().is_empty()),
        );
    }
    // Deepest first; only empty directories can be removed.
    let mut dirs: Vec<&Path> = dirs.into_iter().collect();
    dirs.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
    for dir in dirs {
        let _ = fs::remove_dir(to.join(dir));
    }
}

/// The node's module directory for the running kernel (the whole `/lib/modules` when the
/// running kernel's directory is not there).
pub fn running_kernel_modules_dir() -> PathBuf {
    let base = Path::new("/lib/modules");
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| base.join(release.trim()))
        .ok()
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(|| base.to_path_buf())
}

/// The names of every file under `root` (not following symlinks, so `build/` is skipped).
pub fn file_names_under(root: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                Ok(kind) if kind.is_file() => {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
                _ => {}
            }
        }
    }
    names
}

/// Whether the kernel has a module of this name (`/sys/module/<name>`).
pub fn module_is_loaded(sysfs_name: &str) -> bool {
    Path::new("/sys/module").join(sysfs_name).exists()
}

/// Writes the termination message; failure to write is logged, not fatal.
pub fn write_termination_message(path: &Path, message: &str) {
    if let Err(err) = fs::write(path, message) {
        log(&format!(
            "warning: cannot write termination message to {}: {err}",
            path.display()
        ));
    }
}

/// One log line of the worker.
pub fn log(message: &str) {
    eprintln!("kmm-worker: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmsg_records_yield_their_text() {
        assert_eq!(
            kmsg_message(
                b"4,1234,5678,-;kmm_ci_consumer: Unknown symbol x (err -2)\n SUBSYSTEM=module\n"
            ),
            Some("kmm_ci_consumer: Unknown symbol x (err -2)".to_owned())
        );
        assert_eq!(kmsg_message(b"garbage"), None);
    }

    #[test]
    fn firmware_is_copied_and_removed_by_relative_path() {
        let root = std::env::temp_dir().join(format!("kmm-worker-fw-{}", std::process::id()));
        let image = root.join("image");
        let host = root.join("host");
        fs::create_dir_all(image.join("sub/deeper")).unwrap();
        fs::create_dir_all(host.join("other")).unwrap();
        fs::write(image.join("a.bin"), b"a").unwrap();
        fs::write(image.join("sub/deeper/b.bin"), b"bb").unwrap();
        fs::write(host.join("other/keep.bin"), b"k").unwrap();

        assert_eq!(copy_firmware(&image, &host).unwrap(), 2);
        assert_eq!(fs::read(host.join("sub/deeper/b.bin")).unwrap(), b"bb");
        assert_eq!(
            relative_files(&host).unwrap(),
            [
                PathBuf::from("a.bin"),
                "other/keep.bin".into(),
                "sub/deeper/b.bin".into()
            ]
        );

        remove_firmware(&image, &host);
        assert_eq!(
            relative_files(&host).unwrap(),
            [PathBuf::from("other/keep.bin")]
        );
        assert!(!host.join("sub").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn module_files_are_found_below_a_root_without_following_links() {
        let root = std::env::temp_dir().join(format!("kmm-worker-mods-{}", std::process::id()));
        fs::create_dir_all(root.join("kernel/drivers/net")).unwrap();
        fs::write(root.join("kernel/drivers/net/dummy.ko.xz"), b"").unwrap();
        fs::write(root.join("modules.dep"), b"").unwrap();
        std::os::unix::fs::symlink("/", root.join("build")).unwrap();
        let mut names = file_names_under(&root);
        names.sort();
        assert_eq!(names, ["dummy.ko.xz", "modules.dep"]);
        fs::remove_dir_all(&root).unwrap();
    }
}
