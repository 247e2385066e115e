"""`ft chat`: talk to an exported GGUF (text, images, audio) through llama.cpp, and check that an export chats."""
