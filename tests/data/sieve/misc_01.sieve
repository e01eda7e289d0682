require "envelope"; if envelope :is "TO" "me+tag@x.example" { discard; }
