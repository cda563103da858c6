//! Linux errno values, as KVM returns them (x86-64 numbering).

use core::fmt;

/// A Linux errno value (positive), e.g. [`Errno::EINVAL`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Errno(pub i32);

macro_rules! errnos {
    ($($name:ident = $val:expr, $doc:expr;)*) => {
        impl Errno {
            $(#[doc = $doc] pub const $name: Errno = Errno($val);)*

            /// The symbolic name (`"EINVAL"`), or `None` for values this crate does not name.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($name)),)*
                    _ => None,
                }
            }

            /// Parses a symbolic name (`"EEXIST"`).
            pub fn from_name(name: &str) -> Option<Errno> {
                match name {
                    $(stringify!($name) => Some(Errno::$name),)*
                    _ => None,
                }
            }
        }
    };
}

errnos! {
    EPERM = 1, "Operation not permitted.";
    ENOENT = 2, "No such entry (no slot, or no dirty bitmap).";
    EIO = 5, "I/O error (KVM: internal accounting warning).";
    ENXIO = 6, "No such device or address (KVM: dirty bitmap ioctls while dirty rings are in use).";
    E2BIG = 7, "Argument too big (KVM: dirty ring larger than 65536 entries).";
    EBADF = 9, "Bad file descriptor (a guest_memfd that is not open).";
    EAGAIN = 11, "Try again.";
    ENOMEM = 12, "Out of memory.";
    EFAULT = 14, "Bad address.";
    EBUSY = 16, "Busy.";
    EEXIST = 17, "Exists (KVM: the new slot overlaps another slot).";
    EINVAL = 22, "Invalid argument.";
    ENOSPC = 28, "No space left.";
    ENOTTY = 25, "Inappropriate ioctl.";
    EOPNOTSUPP = 95, "Operation not supported.";
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "errno {}", self.0),
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl core::error::Error for Errno {}
