//! The connect screen: server address and token.

use super::{ClientApp, Conn};

impl ClientApp {
    pub(super) fn connect_screen(&mut self, ui: &mut egui::Ui) {
        let mut enter = false;
        ui.vertical_centered(|ui| {
            ui.add_space(40.0);
            ui.heading("Machine Punishment");
            ui.label("Show the model where to look.");
            ui.add_space(20.0);
        });
        egui::Grid::new("connect").num_columns(2).show(ui, |ui| {
            ui.label("Server");
            ui.add(egui::TextEdit::singleline(&mut self.settings.addr).desired_width(320.0));
            ui.end_row();
            ui.label("Token");
            let token = ui.add(
                egui::TextEdit::singleline(&mut self.settings.token)
                    .password(true)
                    .desired_width(320.0),
            );
            // The cursor starts in the token field (the address is usually right already:
            // remembered, or in a browser the gateway that served the page); Enter connects.
            if !self.token_focused {
                self.token_focused = true;
                token.request_focus();
            }
            if token.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                enter = true;
            }
            ui.end_row();
        });
        ui.add_space(8.0);
        let busy = self.conn == Conn::Connecting;
        ui.horizontal(|ui| {
            if ui
                .add_enabled(!busy, egui::Button::new("Connect"))
                .clicked()
                || (enter && !busy)
            {
                self.connect();
            }
            if busy {
                ui.add(egui::Spinner::new());
            }
        });
    }
}
