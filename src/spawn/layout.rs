//! Where the handed fds go in the successor: the steps that put source `i`
//! at fd `base + i` (`base` is 3), planned in the parent by a pure function
//! ([`plan`], no system call) and walked by the new process between its
//! start and exec (`exec::child`), which only makes the calls the steps
//! name.
//!
//! This is a *parallel move*: every target takes the file of its source at
//! once, while a source may sit on another source's target. A target that
//! no pending step reads is written straight away (`dup2`, which clears
//! `FD_CLOEXEC` on it); a source already at its target only has the flag
//! cleared (`dup2(fd, fd)` would leave it); what is left are cycles (fd 3
//! wants the file at 4, 4 the one at 3), each broken by one copy of one of
//! its fds above the layout (`F_DUPFD_CLOEXEC`), closed once read.
//!
//! Why not simply `dup2` every source above the layout first: a process may
//! be at its fd limit (`RLIMIT_NOFILE` barely above the number of handed
//! fds), and a fix for an fd leak is deployed exactly then. The plan never
//! has more than `n + 1` fds of 3 and above open at once (`n` sources): a
//! target that already holds a file (an unread source) is always written
//! before a free one, and a source above the layout is closed after its
//! last read. Fds below `base` are never written or closed; a source there
//! is only read (it is close-on-exec, as every fd of this crate, and goes
//! at the exec).
//!
//! The same fd may be handed twice (two targets, one source): each target
//! gets its own copy.

use std::os::fd::RawFd;

/// Where a step takes its fd from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Src {
    /// This fd.
    Fd(RawFd),
    /// The copy made by the last [`FdOp::MoveAside`].
    Aside,
}

/// One step of the rearrangement: one system call in the new process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FdOp {
    /// `dup2(from, to)`: `to`, in the layout, takes `from`'s file, not
    /// close-on-exec (`dup2` of two distinct fds clears the flag).
    Dup2 { from: Src, to: RawFd },
    /// `fcntl(from, F_DUPFD_CLOEXEC, lowest)`: a close-on-exec copy of
    /// `from` at the lowest free fd from `lowest` (the end of the layout)
    /// on, read afterwards as [`Src::Aside`]. Breaks a cycle; at most one
    /// such copy is open at a time.
    MoveAside { from: RawFd, lowest: RawFd },
    /// `fcntl(fd, F_SETFD, 0)`: a source already at its target.
    ClearCloexec(RawFd),
    /// `close`: an old copy above the layout (a source, or the copy moved
    /// aside) that no later step reads.
    Close(Src),
}

/// The steps that put the file of `sources[i]` at `base + i`, for every
/// `i`, with nothing else below `base + sources.len()` changed but what was
/// there in the way, and every fd this opens above the layout closed again.
///
/// `sources` are fd numbers (each open in the process that walks the
/// steps; the same number may appear more than once); `base` is at least 3.
/// Linear in the number of sources.
pub(super) fn plan(sources: &[RawFd], base: RawFd) -> Vec<FdOp> {
    let n = sources.len();
    let end = base + n as RawFd;
    // The index in the layout of fd `fd`, if it is a target.
    let slot = |fd: RawFd| (base..end).contains(&fd).then(|| (fd - base) as usize);
    // At most two steps a source (see the tests).
    let mut ops = Vec::with_capacity(2 * n);

    // Each target's source, while its step is pending (`None` once done).
    let mut from: Vec<Option<Src>> = sources.iter().map(|&s| Some(Src::Fd(s))).collect();
    // Whether each target holds a file now (a source sits there, or it was
    // written): writing it then opens no new fd.
    let mut holds = vec![false; n];
    for &s in sources {
        if let Some(j) = slot(s) {
            holds[j] = true;
        }
    }
    // A source already at its target.
    for (i, f) in from.iter_mut().enumerate() {
        if *f == Some(Src::Fd(base + i as RawFd)) {
            ops.push(FdOp::ClearCloexec(base + i as RawFd));
            *f = None;
        }
    }
    // How many pending steps read each target, each fd outside the
    // layout, and the copy moved aside.
    let mut reads_in = vec![0u32; n];
    // The fds outside the layout, numbered by their place in a sorted
    // list, and the number of each step's source among them.
    let mut outside: Vec<RawFd> = sources
        .iter()
        .copied()
        .filter(|&s| slot(s).is_none())
        .collect();
    outside.sort_unstable();
    outside.dedup();
    let out: Vec<usize> = sources
        .iter()
        .map(|s| outside.binary_search(s).unwrap_or(usize::MAX))
        .collect();
    let mut reads_out = vec![0u32; outside.len()];
    for (i, f) in from.iter().enumerate() {
        match *f {
            None => {}
            Some(Src::Fd(fd)) => match slot(fd) {
                Some(j) => reads_in[j] += 1,
                None => reads_out[out[i]] += 1,
            },
            Some(Src::Aside) => unreachable!("no copy moved aside yet"),
        }
    }
    let mut reads_aside = 0u32;

    // Pending steps that nothing pending reads the target of.
    let mut ready = Ready::default();
    for i in (0..n).rev() {
        if from[i].is_some() && reads_in[i] == 0 {
            ready.push(i, holds[i]);
        }
    }
    // Where to look for a pending step when none is ready (steps only ever
    // stop being pending: one pass over all cycles).
    let mut cursor = 0;
    let mut left = from.iter().flatten().count();
    while left > 0 {
        let Some(i) = ready.pop() else {
            // Every pending target is read by exactly one pending step: the
            // pending steps are cycles. Break the one through the first
            // pending target: copy its file aside, and the step that read it
            // reads the copy.
            while from[cursor].is_none() {
                cursor += 1;
            }
            let target = base + cursor as RawFd;
            ops.push(FdOp::MoveAside {
                from: target,
                lowest: end,
            });
            // Its reader is the one before it in the cycle: follow it round.
            let mut k = cursor;
            while from[k] != Some(Src::Fd(target)) {
                let Some(Src::Fd(next)) = from[k] else {
                    unreachable!("a cycle reads only targets")
                };
                k = slot(next).expect("a cycle reads only targets");
            }
            from[k] = Some(Src::Aside);
            reads_aside = 1;
            reads_in[cursor] = 0;
            ready.push(cursor, holds[cursor]);
            continue;
        };
        let src = from[i].take().expect("a ready step is pending");
        left -= 1;
        ops.push(FdOp::Dup2 {
            from: src,
            to: base + i as RawFd,
        });
        holds[i] = true;
        match src {
            Src::Fd(fd) => match slot(fd) {
                Some(j) => {
                    reads_in[j] -= 1;
                    if reads_in[j] == 0 && from[j].is_some() {
                        ready.push(j, holds[j]);
                    }
                }
                None => {
                    let reads = &mut reads_out[out[i]];
                    *reads -= 1;
                    // Below the layout: not ours to close (close-on-exec).
                    if *reads == 0 && fd >= end {
                        ops.push(FdOp::Close(src));
                    }
                }
            },
            Src::Aside => {
                reads_aside -= 1;
                if reads_aside == 0 {
                    ops.push(FdOp::Close(Src::Aside));
                }
            }
        }
    }
    ops
}

/// Pending steps whose target no pending step reads.
#[derive(Default)]
struct Ready {
    /// Those whose target holds a file: writing it opens no fd.
    replace: Vec<usize>,
    /// Those whose target is free.
    fill: Vec<usize>,
}

impl Ready {
    fn push(&mut self, i: usize, holds: bool) {
        if holds {
            self.replace.push(i)
        } else {
            self.fill.push(i)
        }
    }

    /// The next to write: one that opens no fd first. (Taking those first
    /// is what keeps the plan within `n + 1` open fds: see the module docs.)
    fn pop(&mut self) -> Option<usize> {
        self.replace.pop().or_else(|| self.fill.pop())
    }
}

#[cfg(test)]
mod tests {
    use super::FdOp::{ClearCloexec, Close, Dup2, MoveAside};
    use super::Src::{Aside, Fd};
    use super::*;

    const BASE: RawFd = 3;

    #[test]
    fn sources_in_place_only_lose_close_on_exec() {
        assert_eq!(
            plan(&[3, 4, 5], BASE),
            [ClearCloexec(3), ClearCloexec(4), ClearCloexec(5)]
        );
        assert_eq!(plan(&[], BASE), []);
    }

    #[test]
    fn sources_above_the_layout_are_closed_after_their_last_read() {
        assert_eq!(
            plan(&[10, 11], BASE),
            [
                Dup2 {
                    from: Fd(10),
                    to: 3
                },
                Close(Fd(10)),
                Dup2 {
                    from: Fd(11),
                    to: 4
                },
                Close(Fd(11)),
            ]
        );
    }

    #[test]
    fn an_fd_handed_twice_is_copied_to_both_targets_and_closed_once() {
        assert_eq!(
            plan(&[10, 10], BASE),
            [
                Dup2 {
                    from: Fd(10),
                    to: 3
                },
                Dup2 {
                    from: Fd(10),
                    to: 4
                },
                Close(Fd(10)),
            ]
        );
        // Handed twice, and sitting on the first target.
        assert_eq!(
            plan(&[3, 3], BASE),
            [ClearCloexec(3), Dup2 { from: Fd(3), to: 4 }]
        );
    }

    #[test]
    fn a_source_below_the_layout_is_read_but_never_closed() {
        assert_eq!(plan(&[0], BASE), [Dup2 { from: Fd(0), to: 3 }]);
    }

    #[test]
    fn a_swap_takes_one_copy_aside() {
        assert_eq!(
            plan(&[4, 3], BASE),
            [
                MoveAside { from: 3, lowest: 5 },
                Dup2 { from: Fd(4), to: 3 },
                Dup2 { from: Aside, to: 4 },
                Close(Aside),
            ]
        );
    }

    /// The channel, handed last, at fd 3 (the first free fd of a process
    /// that hands fds from higher up): it goes to its target before fd 3
    /// is written, and no copy is made aside.
    #[test]
    fn the_channel_at_3_moves_before_its_fd_is_written() {
        assert_eq!(
            plan(&[10, 11, 3], BASE),
            [
                Dup2 {
                    from: Fd(11),
                    to: 4
                },
                Close(Fd(11)),
                Dup2 { from: Fd(3), to: 5 },
                Dup2 {
                    from: Fd(10),
                    to: 3
                },
                Close(Fd(10)),
            ]
        );
    }

    /// What the steps do to a process's fd table, as the kernel would.
    #[derive(Clone, Debug)]
    struct Table {
        /// By fd: its open file and close-on-exec flag, if it is open.
        fds: Vec<Option<(RawFd, bool)>>,
        aside: Option<RawFd>,
        /// How many fds of 3 and above are open.
        high: usize,
    }

    impl Table {
        /// 0-2 open on files of their own, not close-on-exec; each source
        /// open (a source below 3 replaces that std fd), close-on-exec, on
        /// a file named after its fd number.
        fn new(sources: &[RawFd]) -> Table {
            // Room for every fd the steps can open: the layout, and one
            // copy aside above the highest fd.
            let top = sources.iter().copied().max().unwrap_or(0) + sources.len() as RawFd;
            let mut fds = vec![None; top as usize + 5];
            for (fd, entry) in fds.iter_mut().take(3).enumerate() {
                *entry = Some((-1 - fd as RawFd, false));
            }
            for &s in sources {
                fds[s as usize] = Some((s, true));
            }
            let high = fds[3..].iter().flatten().count();
            Table {
                fds,
                aside: None,
                high,
            }
        }

        fn open(&mut self, fd: RawFd, file: RawFd, cloexec: bool) {
            if self.fds[fd as usize].replace((file, cloexec)).is_none() && fd >= 3 {
                self.high += 1;
            }
        }

        fn file(&self, src: Src) -> RawFd {
            let fd = match src {
                Fd(fd) => fd,
                Aside => self.aside.expect("a copy is aside"),
            };
            self.fds[fd as usize]
                .unwrap_or_else(|| panic!("fd {fd} read but closed"))
                .0
        }

        fn apply(&mut self, op: FdOp, end: RawFd) {
            match op {
                Dup2 { from, to } => {
                    assert!(
                        (BASE..end).contains(&to),
                        "{op:?} writes outside the layout"
                    );
                    assert_ne!(from, Fd(to), "dup2(fd, fd) keeps FD_CLOEXEC");
                    let file = self.file(from);
                    self.open(to, file, false);
                }
                MoveAside { from, lowest } => {
                    assert_eq!(lowest, end);
                    assert!(self.aside.is_none(), "two copies aside at once");
                    let file = self.file(Fd(from));
                    let fd = (lowest..)
                        .find(|&fd| self.fds[fd as usize].is_none())
                        .unwrap();
                    self.open(fd, file, true);
                    self.aside = Some(fd);
                }
                ClearCloexec(fd) => {
                    assert!((BASE..end).contains(&fd), "{op:?} outside the layout");
                    self.fds[fd as usize].as_mut().expect("open").1 = false;
                }
                Close(src) => {
                    let fd = match src {
                        Fd(fd) => fd,
                        Aside => self.aside.take().expect("a copy is aside"),
                    };
                    assert!(fd >= end, "{op:?} closes below the end of the layout");
                    self.fds[fd as usize].take().expect("closed once");
                    self.high -= 1;
                }
            }
        }
    }

    /// Plans for `sources`, walks the steps on a model of the fd table and
    /// checks the result: target `3 + i` holds source `i`'s file, not
    /// close-on-exec; 0-2 as they were; every other fd closed or
    /// close-on-exec; never more than `n + 1` fds of 3 and above open.
    fn check(sources: &[RawFd]) {
        let n = sources.len();
        let end = BASE + n as RawFd;
        let ops = plan(sources, BASE);
        let before = Table::new(sources);
        let mut table = before.clone();
        let mut peak = table.high;
        for &op in &ops {
            table.apply(op, end);
            peak = peak.max(table.high);
        }
        let case = || format!("sources {sources:?}: {ops:?} left {:?}", table.fds);
        assert!(table.aside.is_none(), "{}", case());
        for (i, &s) in sources.iter().enumerate() {
            let target = BASE + i as RawFd;
            assert_eq!(table.fds[target as usize], Some((s, false)), "{}", case());
        }
        for fd in 0..BASE {
            assert_eq!(
                table.fds[fd as usize],
                before.fds[fd as usize],
                "{}",
                case()
            );
        }
        for (fd, entry) in table.fds.iter().enumerate().skip(end as usize) {
            if let Some((_, cloexec)) = entry {
                assert!(cloexec, "fd {fd} left open across exec: {}", case());
            }
        }
        assert!(peak <= n + 1, "{peak} fds open at once: {}", case());
        // One step per target, a close per source above the layout (not in
        // a cycle), a copy aside and its close per cycle (of 2 or more).
        assert!(ops.len() <= 2 * n, "{}", case());
    }

    /// Calls `f` with every arrangement of `k` of `pool`'s values (distinct
    /// positions), in every order.
    fn arrangements(pool: &[RawFd], k: usize, f: &mut impl FnMut(&[RawFd])) {
        fn go(
            pool: &[RawFd],
            used: &mut [bool],
            k: usize,
            cur: &mut Vec<RawFd>,
            f: &mut impl FnMut(&[RawFd]),
        ) {
            if cur.len() == k {
                return f(cur);
            }
            for i in 0..pool.len() {
                if !used[i] {
                    used[i] = true;
                    cur.push(pool[i]);
                    go(pool, used, k, cur, f);
                    cur.pop();
                    used[i] = false;
                }
            }
        }
        go(pool, &mut vec![false; pool.len()], k, &mut Vec::new(), f)
    }

    /// Every permutation of up to 8 fds drawn from the targets and the
    /// first fd above them: chains, cycles, the channel at 3, sources at
    /// their target, one source above the layout.
    #[test]
    fn every_permutation_of_up_to_8_fds_over_the_targets_lands_in_place() {
        let mut cases = 0usize;
        for n in 0..=8 {
            let pool: Vec<RawFd> = (BASE..=BASE + n as RawFd).collect();
            arrangements(&pool, n, &mut |s| {
                check(s);
                cases += 1;
            });
        }
        // (n + 1)! orders of n of the n + 1 values, for each n.
        assert_eq!(cases, (0..=8).map(|n| (1..=n + 1).product::<usize>()).sum());
    }

    /// Every sequence of up to 5 fds, repeats allowed, from a pool that
    /// holds a std fd, the targets, fds just above them and one far above.
    #[test]
    fn every_sequence_of_up_to_5_fds_with_repeats_lands_in_place() {
        for n in 0..=5u32 {
            let mut pool: Vec<RawFd> = vec![0];
            pool.extend(BASE..BASE + n as RawFd + 2);
            pool.push(40);
            let p = pool.len();
            for mut code in 0..p.pow(n) {
                let sources: Vec<RawFd> = (0..n)
                    .map(|_| {
                        let v = pool[code % p];
                        code /= p;
                        v
                    })
                    .collect();
                check(&sources);
            }
        }
    }

    /// Random sequences of 6 to 8 fds, repeats allowed (xorshift, fixed
    /// seed: the same cases every run).
    #[test]
    fn random_sequences_of_6_to_8_fds_with_repeats_land_in_place() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..100_000 {
            let n = 6 + (next() % 3) as usize;
            let sources: Vec<RawFd> = (0..n)
                .map(|_| match next() % 16 {
                    0 => (next() % 3) as RawFd,
                    1 => 100,
                    r => BASE + (r as RawFd - 2) % (n as RawFd + 3),
                })
                .collect();
            check(&sources);
        }
    }

    #[test]
    fn ten_thousand_fds_reversed_take_one_copy_aside_per_pair() {
        let sources: Vec<RawFd> = (BASE..BASE + 10_000).rev().collect();
        let ops = plan(&sources, BASE);
        let asides = ops.iter().filter(|o| matches!(o, MoveAside { .. })).count();
        assert_eq!(asides, 5_000);
        check(&sources);
    }
}
