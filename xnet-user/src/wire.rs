//! A bounds-checked cursor over a byte slice: the one the BGP and IKE codecs read with.
//! Every read either has its bytes or says how many it needed and how many were left;
//! each codec turns that into its protocol's error (a NOTIFICATION, an IKE notify).

/// Too few bytes left for a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    pub need: usize,
    pub left: usize,
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    /// Bytes read so far.
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let left = self.left();
        if left < n {
            return Err(Short { need: n, left });
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }
    pub fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, Short> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, Short> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        let b = &self.buf[self.pos..];
        self.pos = self.buf.len();
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_network_order_and_refuses_to_run_past_the_end() {
        let mut r = Reader::new(&[1, 0, 2, 0, 0, 0, 3, 9]);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(2));
        assert_eq!(r.u32(), Ok(3));
        assert_eq!(r.pos(), 7);
        assert_eq!(r.u16(), Err(Short { need: 2, left: 1 }));
        assert_eq!(r.pos(), 7, "a failed read takes nothing");
        assert_eq!(r.rest(), [9]);
        assert_eq!(r.bytes(0), Ok(&[][..]));
        assert_eq!(r.u8(), Err(Short { need: 1, left: 0 }));
    }
}
