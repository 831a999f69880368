// Loads the client (mp-client compiled to WebAssembly); its start function takes the canvas.
import init from "./mp_client.js";

init().catch((e) => {
  const s = document.getElementById("mp-status");
  s.textContent = "The client could not load: " + e;
  s.className = "failed";
});
