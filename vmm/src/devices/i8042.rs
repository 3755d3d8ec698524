//! The part of the i8042 keyboard controller a guest uses to reset the machine: command 0xFE
//! (pulse reset line) on port 0x64. Everything else reads as an idle controller.

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const COMMAND_PORT: u16 = 0x64;
/// The "pulse reset line" command.
pub const CMD_RESET: u8 = 0xfe;

/// What a write to the controller asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum I8042Action {
    /// Nothing to do.
    None,
    /// The guest asked for a CPU reset.
    Reset,
}

/// Handles a write to `port`.
pub fn write(port: u16, value: u8) -> I8042Action {
    if port == COMMAND_PORT && value == CMD_RESET {
        I8042Action::Reset
    } else {
        I8042Action::None
    }
}

/// Handles a read: status 0 (no data, ready for input), data 0.
pub fn read(_port: u16) -> u8 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fe_on_command_port_resets() {
        assert_eq!(write(COMMAND_PORT, CMD_RESET), I8042Action::Reset);
        assert_eq!(write(DATA_PORT, CMD_RESET), I8042Action::None);
        assert_eq!(write(COMMAND_PORT, 0xfd), I8042Action::None);
        assert_eq!(read(COMMAND_PORT), 0);
    }
}
