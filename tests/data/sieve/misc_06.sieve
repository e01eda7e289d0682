require "vacation"; vacation :mime "Content-Type: text/plain\r\n\r\nx";
