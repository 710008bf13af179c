//! Fixed newstyle negotiation and option haggling, server side.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    client_flags, handshake_flags, info, opt, rep, IHAVEOPT, MAX_OPTIONS, MAX_OPTION_DATA,
    MAX_PAYLOAD, MAX_STRING_LEN, MIN_BLOCK_SIZE, NBD_MAGIC, OPTION_REPLY_MAGIC,
    PREFERRED_BLOCK_SIZE,
};

/// Length of an option header: magic, option, data length.
const OPTION_HEADER_LEN: usize = 16;
/// Padding after the `NBD_OPT_EXPORT_NAME` reply unless the client asked for none.
const EXPORT_NAME_PADDING: usize = 124;

/// What the handshake needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The canonical name (what `NBD_OPT_LIST` shows).
    pub name: String,
    /// Human-readable description; may be empty.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (see [`super::export_flags`]).
    pub flags: u16,
}

/// One line of an `NBD_OPT_LIST` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    /// The export name.
    pub name: String,
    /// Human-readable description; may be empty.
    pub description: String,
}

/// The exports a handshake may choose from, as the server sees them right now.
///
/// Names and descriptions must already satisfy the protocol's string rules (UTF-8, no NUL,
/// at most [`MAX_STRING_LEN`] bytes); the server checks them when an export is added.
pub trait ExportCatalog {
    /// The export a client asked for by name; the empty name asks for the default export.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportListing>;
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Canonical name of the chosen export.
    pub export: String,
    /// Export size sent to the client.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// Where [`ServerHandshake::handle`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// All complete input was processed; more is needed.
    NeedInput,
    /// The client chose an export; after the pending output is sent, the transmission phase
    /// starts. Input left in the buffer belongs to that phase.
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT`: send the pending output (the ACK) and close.
    Aborted,
}

/// Why a handshake ends with a hard disconnect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client set flags this server did not offer.
    #[error("client flags {0:#x} include bits this server does not know")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (that option cannot be
    /// answered with an error, so the protocol demands a disconnect).
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` with a name longer than the protocol allows.
    #[error("NBD_OPT_EXPORT_NAME with a {0}-byte name (limit {MAX_STRING_LEN})")]
    ExportNameTooLong(u32),
    /// `NBD_OPT_EXPORT_NAME` with a name that is not UTF-8.
    #[error("NBD_OPT_EXPORT_NAME with a name that is not UTF-8")]
    ExportNameNotUtf8,
    /// The client kept sending options past [`MAX_OPTIONS`].
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` while the server shuts down (no error reply is possible).
    #[error("NBD_OPT_EXPORT_NAME while the server shuts down")]
    ShuttingDown,
    /// [`ServerHandshake::handle`] was called after the handshake had ended.
    #[error("the handshake has already ended")]
    Finished,
}

/// What to do once the data of a skipped option has gone by.
#[derive(Debug, Clone, Copy)]
enum AfterSkip {
    /// Send this error reply with this message.
    Reply(u32, &'static str),
    /// Acknowledge `NBD_OPT_ABORT` (whose data the server must ignore).
    Abort,
}

#[derive(Debug, Clone, Copy)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        len: usize,
    },
    Skip {
        option: u32,
        remaining: usize,
        then: AfterSkip,
    },
    Finished,
}

/// The server side of the fixed newstyle handshake.
///
/// Created with the server's greeting already queued. Feed client bytes to
/// [`handle`](Self::handle), send whatever [`take_output`](Self::take_output) returns after
/// every call, until it reports [`Progress::Transmission`] or [`Progress::Aborted`], or
/// fails (then close the connection without sending anything more).
#[derive(Debug)]
pub struct ServerHandshake {
    state: State,
    out: BytesMut,
    no_zeroes: bool,
    options: u32,
    shutting_down: bool,
}

impl Default for ServerHandshake {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerHandshake {
    /// A new handshake, with `NBDMAGIC`, `IHAVEOPT` and the handshake flags queued.
    pub fn new() -> Self {
        let mut out = BytesMut::with_capacity(18);
        out.put_u64(NBD_MAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        Self {
            state: State::ClientFlags,
            out,
            no_zeroes: false,
            options: 0,
            shutting_down: false,
        }
    }

    /// Whether output is waiting to be sent.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The bytes to send to the client now (empty if none).
    pub fn take_output(&mut self) -> Bytes {
        self.out.split().freeze()
    }

    /// From now on answer every option except `NBD_OPT_ABORT` with `NBD_REP_ERR_SHUTDOWN`,
    /// which tells the client to disconnect.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Whether [`begin_shutdown`](Self::begin_shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Consume as much of `input` as forms complete messages and queue the answers.
    pub fn handle(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, HandshakeError> {
        loop {
            match self.state {
                State::Finished => return Err(HandshakeError::Finished),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(Progress::NeedInput);
                    }
                    let flags = input.get_u32();
                    if flags & !client_flags::KNOWN != 0 {
                        self.state = State::Finished;
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    // A client without NBD_FLAG_C_FIXED_NEWSTYLE is served as if it had set
                    // it (the protocol allows that): replying to options it does not send
                    // costs nothing.
                    self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if input.len() < OPTION_HEADER_LEN {
                        return Ok(Progress::NeedInput);
                    }
                    let magic = input.get_u64();
                    let option = input.get_u32();
                    let len = input.get_u32();
                    if magic != IHAVEOPT {
                        self.state = State::Finished;
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    self.options += 1;
                    if self.options > MAX_OPTIONS {
                        self.state = State::Finished;
                        return Err(HandshakeError::TooManyOptions);
                    }
                    if option == opt::EXPORT_NAME && len as usize > MAX_STRING_LEN {
                        self.state = State::Finished;
                        return Err(HandshakeError::ExportNameTooLong(len));
                    }
                    self.state = if len > MAX_OPTION_DATA {
                        State::Skip {
                            option,
                            remaining: len as usize,
                            then: if option == opt::ABORT {
                                AfterSkip::Abort
                            } else {
                                AfterSkip::Reply(rep::ERR_TOO_BIG, "option data too long")
                            },
                        }
                    } else {
                        State::OptionData {
                            option,
                            len: len as usize,
                        }
                    };
                }
                State::OptionData { option, len } => {
                    if input.len() < len {
                        return Ok(Progress::NeedInput);
                    }
                    let data = input.split_to(len).freeze();
                    self.state = State::OptionHeader;
                    match self.option(option, &data, catalog) {
                        Ok(Progress::NeedInput) => {}
                        Ok(done) => {
                            self.state = State::Finished;
                            return Ok(done);
                        }
                        Err(e) => {
                            self.state = State::Finished;
                            return Err(e);
                        }
                    }
                }
                State::Skip {
                    option,
                    remaining,
                    then,
                } => {
                    let n = remaining.min(input.len());
                    input.advance(n);
                    if n < remaining {
                        self.state = State::Skip {
                            option,
                            remaining: remaining - n,
                            then,
                        };
                        return Ok(Progress::NeedInput);
                    }
                    self.state = State::OptionHeader;
                    match then {
                        AfterSkip::Abort => {
                            self.reply(option, rep::ACK, &[]);
                            self.state = State::Finished;
                            return Ok(Progress::Aborted);
                        }
                        AfterSkip::Reply(kind, message) => {
                            self.reply(option, kind, message.as_bytes());
                        }
                    }
                }
            }
        }
    }

    /// Answer one complete option. `NeedInput` means "answered, go on with the next".
    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, HandshakeError> {
        if option == opt::ABORT {
            // Any data is ignored, as the protocol asks.
            self.reply(option, rep::ACK, &[]);
            return Ok(Progress::Aborted);
        }
        if self.shutting_down {
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::ShuttingDown);
            }
            self.reply(option, rep::ERR_SHUTDOWN, b"server is shutting down");
            return Ok(Progress::NeedInput);
        }
        match option {
            opt::EXPORT_NAME => self.export_name(data, catalog),
            opt::LIST => {
                if !data.is_empty() {
                    self.reply(option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data");
                } else {
                    for export in catalog.list() {
                        let mut payload = BytesMut::with_capacity(
                            4 + export.name.len() + export.description.len(),
                        );
                        payload.put_u32(export.name.len() as u32);
                        payload.put_slice(export.name.as_bytes());
                        payload.put_slice(export.description.as_bytes());
                        self.reply(option, rep::SERVER, &payload);
                    }
                    self.reply(option, rep::ACK, &[]);
                }
                Ok(Progress::NeedInput)
            }
            opt::INFO | opt::GO => Ok(self.info_or_go(option, data, catalog)),
            opt::STARTTLS => {
                self.reply(option, rep::ERR_UNSUP, b"TLS is not supported");
                Ok(Progress::NeedInput)
            }
            opt::STRUCTURED_REPLY => {
                self.reply(option, rep::ERR_UNSUP, b"only simple replies are supported");
                Ok(Progress::NeedInput)
            }
            _ => {
                self.reply(option, rep::ERR_UNSUP, b"option not supported");
                Ok(Progress::NeedInput)
            }
        }
    }

    fn export_name(
        &mut self,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, HandshakeError> {
        let name = std::str::from_utf8(data).map_err(|_| HandshakeError::ExportNameNotUtf8)?;
        let export = catalog
            .lookup(name)
            .ok_or_else(|| HandshakeError::UnknownExport(name.to_owned()))?;
        self.out.put_u64(export.size);
        self.out.put_u16(export.flags);
        if !self.no_zeroes {
            self.out.put_bytes(0, EXPORT_NAME_PADDING);
        }
        Ok(Progress::Transmission(Negotiated {
            export: export.name,
            size: export.size,
            flags: export.flags,
        }))
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) -> Progress {
        let (name, requests) = match parse_info_request(data) {
            Ok(parsed) => parsed,
            Err(message) => {
                self.reply(option, rep::ERR_INVALID, message.as_bytes());
                return Progress::NeedInput;
            }
        };
        let Some(export) = catalog.lookup(name) else {
            let message = format!("export {name:?} not found");
            self.reply(option, rep::ERR_UNKNOWN, message.as_bytes());
            return Progress::NeedInput;
        };

        let mut item = BytesMut::with_capacity(14);
        item.put_u16(info::EXPORT);
        item.put_u64(export.size);
        item.put_u16(export.flags);
        self.reply(option, rep::INFO, &item);

        if requests.contains(&info::NAME) {
            item.clear();
            item.put_u16(info::NAME);
            item.put_slice(export.name.as_bytes());
            self.reply(option, rep::INFO, &item);
        }
        if requests.contains(&info::DESCRIPTION) && !export.description.is_empty() {
            item.clear();
            item.put_u16(info::DESCRIPTION);
            item.put_slice(export.description.as_bytes());
            self.reply(option, rep::INFO, &item);
        }
        // Sent whether asked for or not (the protocol allows unrequested information): it
        // tells every client that knows it about the request-size limit.
        item.clear();
        item.put_u16(info::BLOCK_SIZE);
        item.put_u32(MIN_BLOCK_SIZE);
        item.put_u32(PREFERRED_BLOCK_SIZE);
        item.put_u32(MAX_PAYLOAD);
        self.reply(option, rep::INFO, &item);

        self.reply(option, rep::ACK, &[]);
        if option == opt::GO {
            Progress::Transmission(Negotiated {
                export: export.name,
                size: export.size,
                flags: export.flags,
            })
        } else {
            Progress::NeedInput
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.out.reserve(20 + data.len());
        self.out.put_u64(OPTION_REPLY_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(kind);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }
}

/// Split `NBD_OPT_INFO` / `NBD_OPT_GO` data into the export name and the information
/// requests, or say why it is invalid.
fn parse_info_request(mut data: &[u8]) -> Result<(&str, Vec<u16>), &'static str> {
    if data.len() < 6 {
        return Err("option data shorter than 6 bytes");
    }
    let name_len = data.get_u32() as usize;
    if name_len > data.len() - 2 {
        return Err("export name longer than the option data");
    }
    if name_len > MAX_STRING_LEN {
        return Err("export name longer than 4096 bytes");
    }
    let (name, mut rest) = data.split_at(name_len);
    let name = std::str::from_utf8(name).map_err(|_| "export name is not UTF-8")?;
    let count = rest.get_u16() as usize;
    if rest.len() != 2 * count {
        return Err("number of information requests does not match the option length");
    }
    let requests = (0..count).map(|_| rest.get_u16()).collect();
    Ok((name, requests))
}
